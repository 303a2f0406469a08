"""``iqa`` subcommands: each module has ``register(subparsers)``, and imports heavy code lazily."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any


class HelpFormatter(argparse.HelpFormatter):
    """Wrap prose paragraphs, keep indented example lines as written, show real defaults."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.split("\n\n"):
            if "\n  " in block or block.startswith("  "):
                blocks.append("\n".join(indent + line for line in block.splitlines()))
            else:
                blocks.append(
                    textwrap.fill(
                        " ".join(block.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                        break_on_hyphens=False,
                    )
                )
        return "\n\n".join(blocks)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # Only defaults that tell something: not None (computed later) or on- and off-switches.
        default = action.default
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if "%(default)" not in text and not switch and not any(default is v for v in (None, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def _whole_number(text: str, least: int, expected: str) -> int:
    """``int(text)`` if it is at least ``least``, else argparse's error saying ``expected``."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """``type=`` of options that take a positive integer: a clear one-line error otherwise."""
    return _whole_number(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """``type=`` of options that take a whole number >= 0 (where 0 has a meaning the help states)."""
    return _whole_number(text, 0, "a whole number >= 0")


def check_target(path: Path | None, option: str, example: str, what: str = "file") -> None:
    """Refuse an output path that is a folder before any work is done (not after minutes of it)."""
    if path is not None and Path(path).is_dir():
        raise IsADirectoryError(
            f"{option} {path}: is a folder; expected the path of the {what} to write (e.g. {Path(path) / example})"
        )


def draw_image(ax: Any, image: Any) -> None:
    """One ``(C, H, W)`` ``uint8`` image on a matplotlib axis: grey as grey, colour as RGB, at its true levels."""
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image[:3].transpose(1, 2, 0))


def report_write_error(command: str, path: str | os.PathLike[str], error: OSError) -> int:
    """Print the one-line error of an output that could not be written; returns the exit status, 2.

    Disk full, no permission, a file where the folder should be: the writes
    are atomic, so whatever was at ``path`` is still there, unchanged.
    """
    from iqa_env.files import not_a_folder_hint

    reason = not_a_folder_hint(path) or error.strerror or str(error)
    print(
        f"iqa {command}: error: cannot write {path} ({reason}); nothing was changed there: "
        "check the folder's free space and permissions, or choose another --out",
        file=sys.stderr,
    )
    return 2


def json_object(text: str) -> dict[str, Any]:
    """``type=`` of options that take a JSON object of keyword arguments (``--env-kwargs``, ``--agent-kwargs``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of keyword arguments, got {text!r}")
    return value


def add_mirror_argument(p: argparse.ArgumentParser) -> None:
    """``--no-mirror-average``, of ``iqa train``, ``iqa reproduce`` and ``iqa benchmark-algorithms``."""
    p.add_argument(
        "--no-mirror-average",
        dest="mirror_average",
        action="store_false",
        help="controllers score each image alone. By default a score is the mean of the controller's scores "
        "of the image and of its mirror image (TrainConfig.mirror_average, docs/learning-status.md section 86); "
        "use this for images whose mirror is another kind of image (text, a known side)",
    )

"""Atomic file writes (a reader sees the old file or the new one, never half of one), and versioned JSON reads."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def short_reason(error: BaseException, limit: int = 200) -> str:
    """A library's error message on one line, for our own: whole sentences up to ``limit`` characters.

    torch's messages span lines and run on for several sentences; cut
    mid-sentence they read as a different claim.  Falls back to the
    exception's type name when the message is empty, and to a cut marked
    with "..." when the first sentence alone is longer than ``limit``.
    """
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return text[: end + 1] if end > 0 else text[: limit - 4].rstrip() + " ..."


def blocking_file(folder: str | os.PathLike[str]) -> Path | None:
    """The file (or other non-folder) at ``folder`` or at the nearest of its parents that exists, or None.

    A folder cannot be made, nor a file written into it, where one of these
    stands: ``mkdir`` says "File exists" or "Not a directory", which names
    neither the path at fault nor what to do.
    """
    for p in (Path(folder), *Path(folder).parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def not_a_folder_hint(path: str | os.PathLike[str]) -> str:
    """For an error writing the file ``path``: why, where a file stands in the way of its folder, else ''."""
    p = blocking_file(Path(path).parent)
    return "" if p is None else f"{p} is a file, not a folder"


def check_warmup_cache(folder: str | os.PathLike[str]) -> None:
    """Refuse a ``warmup_cache`` folder where a file stands at it or at one of its parents: said when the
    setting is given (the env, ``TrainConfig``), not after a warm-up whose result could not be kept."""
    blocking = blocking_file(folder)
    if blocking is not None:
        raise ValueError(
            f"warmup_cache must be a folder (made if missing) to keep predictor warm-ups in, got {str(folder)!r}: "
            f"{blocking} is a file, not a folder"
        )


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The folder is created if needed; on failure the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, newline: str | None = None) -> Path:
    """Write ``text`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline=newline) as f:
            f.write(text)

    return atomic_write(path, write)


def read_versioned_json(path: str | os.PathLike[str], fmt: str, version: int, what: str, remedy: str = "") -> dict[str, Any]:
    """The JSON object at ``path`` whose ``"format"`` is ``fmt`` and ``"format_version"`` is ``version``.

    Anything else is a ``ValueError`` naming the file, what was expected
    (``what``, e.g. "a training checkpoint") and ``remedy`` when given.
    """
    path = Path(path)
    tail = f"; {remedy}" if remedy else ""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}){tail}") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ValueError(f"{path}: not {what} (expected a JSON object with \"format\": \"{fmt}\"){tail}")
    if data.get("format_version") != version:
        raise ValueError(
            f"{path}: format_version {data.get('format_version')!r} is not supported "
            f"(this version reads {version}){tail}"
        )
    return data

"""The ``iqa`` command line.

Each subcommand lives in :mod:`experiments.commands`; a module there defines
``register(subparsers)`` which adds its parser and sets ``func(args) -> int``.
Errors a user can act on (``ValueError``, ``TypeError``, ``FileNotFoundError``)
are printed as one line, without a traceback, and exit with status 2; so are
the options argparse refuses (one ``error:`` line, no usage block).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

#: Subcommand modules, in the order ``iqa --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "experiments.commands.data",
    "experiments.commands.train",
    "experiments.commands.score",
    "experiments.commands.bench",
    "experiments.commands.reproduce",
    "experiments.commands.benchmark_algorithms",
)


class _Parser(argparse.ArgumentParser):
    """argparse's refusals as one line, like every other error (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # Subparsers are built with the parser's class, so every subcommand refuses the same way.
    parser = _Parser(
        prog="iqa",
        description=(
            "Task-amenability image quality assessment with reinforcement learning "
            "(Saeed et al., IPMI 2021): a controller learns which images a task predictor "
            "can use, by selecting its training samples and being rewarded by its validation "
            "performance."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if args.verbose:
            raise
        print(f"iqa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"iqa {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

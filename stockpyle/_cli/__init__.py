"""The ``stockpyle`` command line: ``demo`` and ``bench``.

Each subcommand lives in its own module and imports its optional packages
(SQLAlchemy, rich, pymemcache, matplotlib) only when it runs, so ``--help``
works on a bare install.  Problems the user can fix -- a missing extra, a bad
URL, an unreachable server -- end the command with one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__

__all__ = ["CLIError", "build_parser", "main"]

#: Exit status for errors the user can fix (same as argparse's usage errors).
USAGE_ERROR = 2


class CLIError(Exception):
    """An error reported as one line on stderr with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m stockpyle``."""
    from . import bench, demo

    parser = argparse.ArgumentParser(
        prog="stockpyle",
        description="stockpyle: layered, write-through object storage and caching.",
    )
    parser.add_argument("--version", action="version", version=f"stockpyle {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_parser(commands)
    bench.add_parser(commands)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    :returns: 0 on success, 1 when a demo check fails, 2 for usage and environment errors.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse reports a subcommand's unknown options with the top-level
        # usage; the subcommand's own usage is the one that helps
        command_parser = _subparsers(parser).get(args.command or "", parser)
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    try:
        status: int = args.handler(args)
    except CLIError as exc:
        print(f"stockpyle {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"stockpyle {args.command}: interrupted", file=sys.stderr)
        return 130
    return status

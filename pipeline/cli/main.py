"""The ``surgery`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import __version__
from pipeline.cli import map_commands, workflow_commands

logger = logging.getLogger("pipeline.cli")


class CommandError(Exception):
    """A failure the CLI reports as one line on stderr with a non-zero exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgery", description="Function-preserving checkpoint surgery with feature sets.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", required=True)
    map_commands.register(commands)
    workflow_commands.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    sys.exit(main())

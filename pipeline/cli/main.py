"""The ``surgery`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import __version__
from pipeline.cli import (
    deploy_commands,
    map_commands,
    plan_commands,
    registry_commands,
    run_commands,
    workflow_commands,
)
from pipeline.cli.errors import CommandError

logger = logging.getLogger("pipeline.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgery", description="Function-preserving checkpoint surgery with feature sets.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", required=True)
    map_commands.register(commands)
    plan_commands.register(commands)
    workflow_commands.register(commands)
    registry_commands.register(commands)
    run_commands.register(commands)
    deploy_commands.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # dask.distributed logs every connection at INFO; show it only at -vv.
    logging.getLogger("distributed").setLevel(logging.DEBUG if args.verbose >= 2 else logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    sys.exit(main())

"""The ``nabla-lc`` command: each subcommand lives in its own module and only translates flags."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# Modules exposing ``add_parser(subparsers)``; each registers one subcommand with ``func=run``.
COMMANDS: tuple[str, ...] = ("nabla_lc.costs", "nabla_lc.bench.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nabla-lc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The ``nabla-lc`` command: each subcommand lives in its own module here and only translates flags."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

COMMANDS: tuple[str, ...] = ("nabla_lc.cli.solve", "nabla_lc.cli.diagnose", "nabla_lc.cli.costs", "nabla_lc.cli.bench", "nabla_lc.cli.train", "nabla_lc.cli.serve")
"""Modules exposing ``add_parsers(subparsers)``; each registers its subcommands with ``func=run...``."""
EXPECTED_ERRORS = (ValueError, OSError, ModuleNotFoundError)
"""Errors of input, files and installation (a bad flag value, a missing model or package, an output in use): one line, exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nabla-lc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parsers(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EXPECTED_ERRORS as err:
        if args.verbose:
            raise  # why: --verbose keeps the traceback for a bug report
        print(f"nabla-lc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

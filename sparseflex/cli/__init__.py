"""The ``sparseflex`` command: a thin layer that parses options and calls the library.

Each sub-command lives in its own module exposing ``register(subparsers)``; user mistakes surface as
:class:`~sparseflex.errors.SparseFlexError` and are printed as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import SparseFlexError

# Sub-command modules, in the order `sparseflex --help` lists them.
COMMANDS = ["fit", "convert", "render", "metrics", "data", "train", "reconstruct", "checkpoint"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseflex", description=__doc__.splitlines()[0])
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"sparseflex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SparseFlexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

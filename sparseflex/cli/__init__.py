"""The ``sparseflex`` command: a thin layer that parses options and calls the library.

Each sub-command lives in its own module exposing ``register(subparsers)``; user mistakes surface as
:class:`~sparseflex.errors.SparseFlexError` and are printed as one line ``error: ...`` with exit status 2, argparse's
own complaints (unknown flags, values an option's type rejects) included: see :mod:`sparseflex.cli.common`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from ..errors import SparseFlexError
from .common import Parser

# Sub-command modules, in the order `sparseflex --help` lists them.
COMMANDS = ["fit", "convert", "render", "metrics", "data", "train", "reconstruct", "structure", "generate", "checkpoint",
            "app"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sparseflex", description=__doc__.splitlines()[0])
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"sparseflex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


#: OSErrors about a location (a path that cannot be created or written) rather than a bug.
_LOCATION_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError, FileNotFoundError)
_LOCATION_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}


def _location_error(exc: OSError) -> str | None:
    """One line for an OSError about a file or folder (the commands check their outputs first, so this is only a
    backstop, e.g. for a disk that fills up); ``None`` for any other OSError, which is a bug to show in full."""
    if not (isinstance(exc, _LOCATION_ERRORS) or exc.errno in _LOCATION_ERRNOS):
        return None
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return " ".join(f"{where}{exc.strerror or exc}".split())


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except SparseFlexError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:
        line = _location_error(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the sub-commands: output paths that are never overwritten silently, option types."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import OptionError


def output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Return ``path`` (parents created) after checking it may be written."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise OptionError(f"{p} exists; pass --overwrite to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")

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


def run_folder(path: str | os.PathLike, resume: bool, overwrite: bool, what: str) -> Path:
    """Check a resumable job's output folder (``checkpoint.pt`` inside) against --resume / --overwrite; never let a
    new job silently mix with or replace a previous one. Returns the checkpoint path."""
    out = Path(path)
    ckpt = out / "checkpoint.pt"
    if resume and overwrite:
        raise OptionError("--resume and --overwrite exclude each other")
    if resume and not ckpt.exists():
        raise OptionError(f"--resume given but {ckpt} does not exist")
    if not resume and not overwrite and out.exists() and any(out.iterdir()):
        raise OptionError(f"{out} is not empty; pass --resume to continue the {what} there or --overwrite to start "
                          "again")
    return ckpt


def check_device(device: str) -> None:
    import torch
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"device {device} requested but CUDA is not available")


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

"""Helpers shared by the sub-commands: option types, output locations that are checked before any work and never
overwritten silently, and clean-up of what a failed command created.

The error contract of every command: a user mistake gives exactly one line ``error: ...`` on stderr and exit
status 2 (never a traceback), and leaves nothing behind (no empty output file or folder). Options are checked
when they are parsed (:func:`number`, :func:`device_option`), output locations before any work (:func:`output_path`,
:func:`output_dir`), and what a command made before failing anyway is removed (:func:`new_dir`).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import OptionError


class UsageError(OptionError):
    """A command line argparse cannot parse (unknown flag, missing argument, a value its type rejects)."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`UsageError` (printed by ``main`` as one ``error:`` line, exit
    status 2) instead of a usage text and ``SystemExit``; sub-parsers inherit the class."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


# -- option types -----------------------------------------------------------------------------------------------------

class Number:
    """An argparse ``type``: parses ``kind`` (``int`` or ``float``) and accepts only finite values within the bounds
    (``low``/``high``, ``None`` for none, each end closed unless ``low_open``/``high_open``). The bounds are
    attributes, so the help and the tests can read them."""

    def __init__(self, kind: type = float, low=None, high=None, *, low_open: bool = False, high_open: bool = False):
        if kind not in (int, float):
            raise TypeError(f"kind must be int or float, not {kind!r}")
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = kind.__name__  # argparse names the type in some of its messages

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {self.high}"
        return what

    def contains(self, value) -> bool:
        if not (isinstance(value, int) or math.isfinite(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __call__(self, text: str):
        try:
            value = self.kind(str(text).strip())
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}; got {text!r}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}; got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"number({self.kind.__name__}, {self.low!r}, {self.high!r}, low_open={self.low_open}, " \
               f"high_open={self.high_open})"


def number(kind: type = float, low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> Number:
    """The argparse ``type`` of a numeric option: finite values of ``kind`` within the bounds (see :class:`Number`).
    NaN and infinities are always rejected."""
    return Number(kind, low, high, low_open=low_open, high_open=high_open)


#: A count of at least one.
positive_int = number(int, 1)
#: Random seeds (numpy's seed sequences and torch's generators take them all).
seed_option = number(int, 0, 2 ** 32 - 1)
#: Sample counts of the metrics against a ground truth.
metrics_points = number(int, 1000, 20_000_000)

DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device) -> None:
    """Raise :class:`OptionError` unless ``device`` (text or ``torch.device``) names a device this machine has:
    ``cpu``, ``cuda``, ``cuda:N`` (N below the number of GPUs) or ``mps``."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type not in DEVICE_TYPES:
        raise OptionError(f"device {dev} is not supported; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"device {device} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise OptionError(f"device {device} requested but this machine has {count} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise OptionError(f"device {device} requested but MPS is not available")
    elif dev.index not in (None, 0):
        raise OptionError(f"device {device}: there is only one cpu device; use cpu")


def device_option(text: str) -> str:
    """The argparse ``type`` of ``--device``: a device this machine has (see :func:`check_device`)."""
    try:
        check_device(text)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# -- output locations -------------------------------------------------------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: str | os.PathLike, target: str | os.PathLike | None = None) -> None:
    """Raise :class:`OptionError` unless files can be created in ``folder`` or, where it does not exist yet, the
    folders to create it can: its nearest existing ancestor must be a folder this process can write in (tried with
    an anonymous temporary file, which leaves no trace; permission bits alone say nothing for root, read-only file
    systems or /proc). ``target`` is the path named in the message (default ``folder``)."""
    target = Path(target if target is not None else folder)
    anc = _nearest_existing(Path(folder))
    if not anc.is_dir():
        raise OptionError(f"cannot write {target}: {anc} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as exc:
        raise OptionError(f"cannot write {target}: {anc} is not writable ({exc.strerror or exc})") from None


def output_path(path: str | os.PathLike, overwrite: bool, suffixes: tuple[str, ...] | None = None) -> Path:
    """Return ``path`` after checking, before any work, that it may be written: its extension is one of
    ``suffixes`` (lower case, with the dot; ``None``: any), it is not a folder, it does not exist unless
    ``overwrite``, and its folder can be created or written in. Creates nothing: the writers (atomic, see
    :mod:`sparseflex.io`) create the missing folders when the result is ready."""
    p = Path(path)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise OptionError(f"{p}: cannot write {p.suffix or '(no extension)'!r} files; use "
                          f"{' or '.join(suffixes)}")
    if p.is_dir():
        raise OptionError(f"{p} is a folder; give a file name")
    if os.path.lexists(p) and not overwrite:
        raise OptionError(f"{p} exists; pass --overwrite to replace it")
    check_writable(p.parent, p)
    return p


def output_dir(path: str | os.PathLike) -> Path:
    """Return the output folder ``path`` after checking it is a folder (or can be made one) that can be written in.
    Creates nothing."""
    p = Path(path)
    if os.path.lexists(p) and not p.is_dir():
        raise OptionError(f"{p} exists and is not a folder")
    check_writable(p)
    return p


@contextmanager
def new_dir(path: str | os.PathLike, keep: tuple[str, ...] | Callable[[Path], bool] = ()) -> Iterator[Path]:
    """Create the output folder ``path`` (and its missing parents) for the block, and if the block raises, remove
    again what this process created: the topmost folder it made, with everything inside, unless that holds a file
    matching one of the glob patterns ``keep`` (something to resume from, such as a checkpoint) or ``keep(folder)``
    is true. A folder that existed before, or that another process made meanwhile, is never removed."""
    p = Path(os.path.abspath(path))
    missing = []
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    made = None
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        made = made or folder
    try:
        yield Path(path)
    except BaseException:
        if made is not None and made.is_dir():
            kept = keep(made) if callable(keep) else any(any(made.glob(k)) for k in keep)
            if not kept:
                shutil.rmtree(made, ignore_errors=True)
        raise


def run_folder(path: str | os.PathLike, resume: bool, overwrite: bool, what: str) -> Path:
    """Check a resumable job's output folder (``checkpoint.pt`` inside) against --resume / --overwrite; never let a
    new job silently mix with or replace a previous one. Returns the checkpoint path."""
    out = output_dir(path)
    ckpt = out / "checkpoint.pt"
    if resume and overwrite:
        raise OptionError("--resume and --overwrite exclude each other")
    if resume and not ckpt.exists():
        raise OptionError(f"--resume given but {ckpt} does not exist")
    if not resume and not overwrite and out.exists() and any(out.iterdir()):
        raise OptionError(f"{out} is not empty; pass --resume to continue the {what} there or --overwrite to start "
                          "again")
    return ckpt


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")

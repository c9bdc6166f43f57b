"""Atomic file output: a result is either absent or complete, never half-written (interruptions, full disks)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that go by it still work); it is renamed over
    ``path`` when the block succeeds and deleted when it raises. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# -- checkpoints that load without running anything ------------------------------------------------------------------
#: Formats of our ``torch.save`` checkpoints (training, fitting); their names appear as plain strings in the pickle.
CHECKPOINT_FORMATS = ("sparseflex-train-1", "sparseflex-fit-1")
#: How to convert a checkpoint written before checkpoints were loaded with ``weights_only=True``.
UPGRADE_COMMAND = "sparseflex checkpoint upgrade"
# What checkpoints of older sparseflex versions need beyond tensors and plain values: numpy arrays and scalars
# (the numpy random state, stray numpy floats), pickled as these globals (``numpy._core`` from numpy 2 on).
_OLD_NUMPY_GLOBALS = {f"numpy.{core}.multiarray.{name}" for core in ("core", "_core")
                      for name in ("_reconstruct", "scalar")} | {"numpy.ndarray", "numpy.dtype"}


def _is_old_numpy_global(name: str) -> bool:
    return name in _OLD_NUMPY_GLOBALS or (name.startswith("numpy.dtypes.") and name.endswith("DType"))


def _pickle_bytes(path: Path) -> bytes:
    """The pickle of a ``torch.save`` zip archive (b"" when it is not one); read as bytes, nothing is unpickled."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            return z.read(names[0]) if names else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return b""


def _unsafe_globals(path: Path, exc: Exception) -> list[str]:
    """The pickle globals the file needs beyond what ``weights_only`` loading allows, found without unpickling: all
    of them where torch can list them (2.5 and later), else the one its refusal names."""
    import torch
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if lister is not None:
        try:
            found = list(lister(path))
            if found:
                return found
        except Exception:  # noqa: BLE001 - not a zip archive (legacy format) or unreadable: fall back to the message
            pass
    import re
    return re.findall(r"GLOBAL ([\w.]+)", str(exc))[:1]


def safe_torch_load(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors and plain Python values (dicts, lists, tuples, numbers,
    strings, None) only, so nothing a crafted file carries is ever run.

    A file that needs any other pickle global is refused with a one-line :class:`~sparseflex.errors.InputError`;
    when it looks like a checkpoint of an older sparseflex (one of our formats, numpy objects being all it needs
    beyond that) the message says how to convert it. Other failures (corrupt or truncated files) propagate as they
    are, for the caller to report.
    """
    import pickle

    import torch

    from .errors import InputError
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        needs = _unsafe_globals(path, exc)
        data = _pickle_bytes(path)
        fmt = next((f for f in CHECKPOINT_FORMATS if f.encode() in data), None)
        if fmt is not None and needs and all(_is_old_numpy_global(n) for n in needs):
            raise InputError(f"{path}: a {fmt} checkpoint of an older sparseflex, whose numpy objects are not "
                             f"loaded safely; if you trust the file, convert it with: {UPGRADE_COMMAND} {path} "
                             f"NEW.pt --trust (to convert it in place, give {path} as NEW.pt and add --overwrite)"
                             ) from None
        if not needs:  # not a refused global: a corrupt or truncated file, which the caller reports
            raise pickle.UnpicklingError(_unpickler_reason(exc)) from None
        raise InputError(f"{path}: not a safe checkpoint: it would call {', '.join(needs[:3])}"
                         f"{' and more' if len(needs) > 3 else ''}; refused, nothing in it was run") from None


def _unpickler_reason(exc: Exception) -> str:
    """The reason in torch's ``weights_only`` error, without its advice to load the file unsafely."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    return next((line.strip() for line in text.splitlines() if line.strip()), "unreadable pickle")


_PLAIN_SCALARS = (str, int, float, bool, bytes, type(None))


def to_plain(obj, where: str = "checkpoint"):
    """``obj`` made of what :func:`safe_torch_load` reads back: dicts, lists, tuples, numbers, strings, bools, None
    and tensors (with torch dtypes, devices and sizes). Numpy scalars become Python numbers and paths strings;
    anything else (numpy arrays, dataclasses, other objects) raises ``TypeError`` naming where it is, a bug of the
    writer rather than a user error. Containers are rebuilt (an ``OrderedDict`` keeps its ``_metadata``)."""
    import collections

    import numpy as np
    import torch
    if type(obj) in (torch.Tensor, torch.nn.Parameter) or isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, np.generic) and not isinstance(obj, (np.void, np.object_)):
        return obj.item()
    if type(obj) in _PLAIN_SCALARS:
        return obj
    for kind in (bool, int, float, str):  # subclasses (IntEnum, ...) as their plain value
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj) in (list, tuple):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if type(obj) in (dict, collections.OrderedDict):
        out = type(obj)()
        for k, v in obj.items():
            out[to_plain(k, f"{where} key")] = to_plain(v, f"{where}[{k!r}]")
        if hasattr(obj, "_metadata"):
            out._metadata = to_plain(obj._metadata, f"{where}._metadata")
        return out
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a checkpoint cannot hold "
                    f"(only tensors and plain Python values load without running code)")

"""Reading and writing VAE weights: the TripoSF safetensors release, our safetensors files and training checkpoints;
converting checkpoints of older versions (:func:`upgrade_checkpoint`).

Checkpoints are read with ``torch.load(weights_only=True)`` (:func:`~sparseflex.io.safe_torch_load`): tensors and plain
values only, so a crafted file cannot run code.

Parameter names of :class:`~sparseflex.models.vae.SparseFlexVAE` are the release's, so mapping a state dict is the
identity (minus a DistributedDataParallel ``module.`` prefix); every key and shape is checked before anything loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, OptionError
from ..io import CHECKPOINT_FORMATS, atomic_path, safe_torch_load, to_plain
from .configs import VAEConfig, get_config
from .vae import SparseFlexVAE

#: ``torch.save`` payload of the trainer: ``{"format", "config" (training), "model_config", "model", "ema", ...}``.
TRAIN_FORMAT = "sparseflex-train-1"
#: safetensors metadata written by :func:`save_weights`.
WEIGHTS_FORMAT = "sparseflex-vae-1"


@dataclass
class Checkpoint:
    """Weights read from a file: ``state`` (name -> tensor), the model ``config`` dict when the file holds one, and
    the training ``task`` that made it (``vae`` for the release's and our VAE safetensors)."""
    state: dict[str, torch.Tensor]
    config: dict | None
    kind: str  # "safetensors" or "train"
    task: str = "vae"
    train_config: dict | None = None  # a training checkpoint's whole training config


def _is_safetensors(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_checkpoint(path: str | os.PathLike, task: str | None = "vae") -> Checkpoint:
    """Read a safetensors file or a ``sparseflex-train-1`` training checkpoint (its EMA weights when present).

    ``task`` (a training task name, ``None`` for any) is what the caller needs: a checkpoint of another model (a
    structure flow given where a VAE belongs, ...) is refused with a one-line error naming both.
    """
    ck = _read_any(Path(path))
    if task is not None and ck.task != task:
        raise InputError(f"{path}: a {ck.task} checkpoint, but a {task} checkpoint is needed here")
    return ck


def _read_any(p: Path) -> Checkpoint:
    if not p.exists():
        raise InputError(f"{p}: no such checkpoint file")
    if not p.is_file():
        raise InputError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: checkpoint file is empty")
    if p.suffix.lower() == ".safetensors" or _is_safetensors(p):
        return _read_safetensors(p)
    try:
        payload = safe_torch_load(p)  # weights_only: a crafted file is refused, nothing in it runs
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a checkpoint we can read
        raise InputError(f"{p}: not a safetensors file or a readable training checkpoint "
                         f"({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if not isinstance(payload, dict) or payload.get("format") != TRAIN_FORMAT:
        raise InputError(f"{p}: not a SparseFlex VAE checkpoint (expected safetensors or a {TRAIN_FORMAT!r} "
                         f"training checkpoint)")
    state = payload.get("ema") or payload.get("model")
    if not isinstance(state, dict):
        raise InputError(f"{p}: training checkpoint holds no model weights")
    train_config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    return Checkpoint(dict(state), payload.get("model_config"), "train", str(train_config.get("task", "vae")),
                      train_config)


def _read_safetensors(p: Path) -> Checkpoint:
    from safetensors import safe_open
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors alike: the file cannot be used
        raise InputError(f"{p}: truncated or corrupt safetensors file ({exc})".splitlines()[0]) from None
    config = None
    if metadata.get("format") == WEIGHTS_FORMAT and "config" in metadata:
        config = json.loads(metadata["config"])
    return Checkpoint(state, config, "safetensors")


def _preview(names: list[str], n: int = 3) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Copy ``state`` into ``model`` after checking that keys and shapes match exactly (one-line InputError).

    Tensors are cast to the model's dtype; a model built on the meta device takes the tensors as its parameters.
    """
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"{len(missing)} missing keys ({_preview(missing)})"] if missing else []) + (
            [f"{len(unexpected)} unexpected keys ({_preview(unexpected)})"] if unexpected else [])
        raise InputError(f"{source}: weights do not match the model: {'; '.join(parts)}")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise InputError(f"{source}: {k} has shape {list(state[k].shape)} but the model needs "
                         f"{list(expected[k].shape)}" + (f" ({len(wrong)} tensors differ)" if len(wrong) > 1 else ""))
    bad = [k for k, v in state.items()
           if not (v.is_floating_point() and (v.is_meta or bool(torch.isfinite(v).all())))]
    if bad:
        raise InputError(f"{source}: tensors that are not finite floating point: {_preview(bad)}")
    on_meta = any(t.is_meta for t in expected.values())
    # a meta model takes the tensors where they are; a real one copies them to its device
    cast = {k: state[k].to(dtype=expected[k].dtype, device=state[k].device if on_meta else expected[k].device)
            for k in expected}
    model.load_state_dict(cast, strict=True, assign=on_meta)
    return model


def load_model(path: str | os.PathLike, config: VAEConfig | str | None = None, device=None) -> SparseFlexVAE:
    """A :class:`SparseFlexVAE` in eval mode with the weights of ``path``.

    The config comes from ``config`` when given, else from the file (training checkpoints and our safetensors
    carry it), else it is ``triposf`` (the release file carries none).
    """
    ck = read_checkpoint(path)
    if config is None:
        config = VAEConfig.from_dict(ck.config) if ck.config is not None else "triposf"
    if isinstance(config, str):
        config = get_config(config)
    with torch.device("meta"):  # no memory and no random initialisation for weights about to be replaced
        model = SparseFlexVAE(config)
    load_weights(model, ck.state, str(path))
    return model.to(device or "cpu").eval()


def save_weights(model: SparseFlexVAE, path: str | os.PathLike) -> Path:
    """Write the weights and config as safetensors, atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": WEIGHTS_FORMAT, "config": json.dumps(model.config.to_dict())}
    with atomic_path(p) as tmp:
        save_file(state, tmp, metadata=metadata)
    return p


def _numpy_globals() -> list:
    """The globals that pickled numpy arrays, dtypes and scalars need: they rebuild data and call nothing else."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "int32", "float32", "bool")]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def upgrade_checkpoint(old: str | os.PathLike, new: str | os.PathLike, trust: bool = False,
                       overwrite: bool = False) -> Path:
    """Convert a training or fit checkpoint written by an older sparseflex (numpy random states, numpy scalars) to
    the current format, which loads with ``weights_only=True``; written to ``new`` atomically.

    The old file is read with ``weights_only=True`` plus numpy's array and scalar constructors (what those states
    hold), so even a crafted file cannot run code; still only with ``trust=True``, since the result is then loaded as
    ours. ``new`` is not replaced unless ``overwrite``.
    """
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise InputError(f"{old}: no such checkpoint file")
    if new.exists() and not overwrite:
        raise OptionError(f"{new} exists; pass --overwrite to replace it")
    if not trust:
        raise OptionError(f"refusing to convert {old} without --trust: the result is loaded as a checkpoint of ours; "
                          f"pass --trust only for a checkpoint you wrote yourself")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):  # numpy arrays and scalars, nothing that runs code
            payload = torch.load(old, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a checkpoint we can convert
        raise InputError(f"{old}: not a readable checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in CHECKPOINT_FORMATS:
        raise InputError(f"{old}: not a SparseFlex checkpoint (expected one of {', '.join(CHECKPOINT_FORMATS)})")
    try:
        if fmt == TRAIN_FORMAT:
            from ..train.trainer import plain_rng_state
            payload = dict(payload, rng=[plain_rng_state(state) for state in payload["rng"]])
        payload = to_plain(payload, str(old))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"cannot convert {old}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    with atomic_path(new) as tmp:
        torch.save(payload, tmp)
        safe_torch_load(tmp)  # what was written loads safely, or nothing is left behind
    return new

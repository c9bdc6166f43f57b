"""Mesh -> latent -> SparseFlex -> mesh with a trained VAE: encode, decode (chunked at high resolution), reconstruct.

A :class:`Latent` keeps the normalisation of the mesh it came from, so decoding returns a mesh in the input's
coordinates; latents are saved as safetensors (``coords``, ``feats``, optional ``center``; resolution and scale in
the metadata).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.mesh import Mesh, Normalization, normalize
from ..errors import InputError, OptionError
from ..flexicubes.representation import SparseFlex
from ..io import atomic_path
from ..models.inputs import mesh_inputs
from ..models.vae import SparseFlexVAE
from ..nn import SparseTensor
from ..sparse.coords import batched

LATENT_FORMAT = "sparseflex-latent-1"


@dataclass
class Latent:
    """A shape's latent: voxels ``coords [N, 3]`` at ``resolution`` with ``feats [N, C]``, and the normalisation
    ``transform`` of its source mesh (``None``: the latent lives in the normalised cube)."""
    coords: torch.Tensor
    feats: torch.Tensor
    resolution: int
    transform: Normalization | None = None


@dataclass
class Reconstruction:
    """Decoder result: the SparseFlex (normalised cube) and its extracted mesh (input coordinates when known)."""
    sparseflex: SparseFlex
    mesh: Mesh
    latent: Latent | None = None
    metrics: dict | None = None


def default_num_points(resolution: int) -> int:
    """Surface samples for a latent resolution: the release's 819,200 at 256, scaled with the surface voxel count."""
    return max(20_000, int(819_200 * (resolution / 256) ** 2))


def _device(model: SparseFlexVAE) -> torch.device:
    return next(model.parameters()).device


#: Numeric precisions of inference: float32, or float16 autocast (CUDA only, as the release runs).
PRECISIONS = ("fp32", "fp16")


def autocast(device: torch.device, precision: str = "fp32"):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise OptionError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise OptionError("fp16 inference needs a CUDA device (on the CPU float32 is the fast path)")
    return torch.autocast("cuda", dtype=torch.float16)


@torch.no_grad()
def encode_mesh(model: SparseFlexVAE, mesh: Mesh, num_points: int | None = None, seed: int = 0,
                resolution: int | None = None, sample: bool = False, precision: str = "fp32") -> Latent:
    """The latent of ``mesh`` (any coordinates; normalised here) at ``resolution`` (default: the config's): the
    posterior mean, or with ``sample`` a posterior sample (the release's inference) drawn from ``seed``."""
    r = resolution or model.config.latent_resolution
    normed, transform = normalize(mesh)
    inp = mesh_inputs(normed, r, num_points or default_num_points(r), seed, jitter=model.config.input_jitter(r))
    dev = _device(model)
    with autocast(dev, precision):
        mean, logvar = model.encode(inp.points.to(dev), inp.normals.to(dev), inp.point_batch.to(dev),
                                    inp.coords.to(dev), r)
    z = model.sample(mean, logvar, torch.Generator().manual_seed(seed)) if sample else mean
    return Latent(z.coords[:, 1:], z.feats.float(), r, transform)


@torch.no_grad()
def decode_latent(model: SparseFlexVAE, latent: Latent, chunk_size: int | None = None, prune: bool | None = None,
                  chunking: str = "whole", precision: str = "fp32") -> Reconstruction:
    """Decode to a SparseFlex and extract its mesh (see :meth:`SparseFlexVAE.decode` for ``prune`` and
    ``chunking``). ``chunk_size`` (latent voxels per axis) bounds the memory of whole-sample decoding at high
    resolution; the result equals unchunked decoding up to rounding. Extraction always runs in float32."""
    c = model.config.latent_channels
    if latent.feats.dim() != 2 or latent.feats.shape[1] != c or len(latent.feats) != len(latent.coords):
        raise InputError(f"latent features {tuple(latent.feats.shape)} do not fit this model ({c} channels per voxel)")
    if len(latent.coords) == 0:
        raise InputError("the latent has no voxels: nothing to decode")
    if chunk_size is not None and chunk_size < 2:
        raise OptionError(f"chunk size must be at least 2 latent voxels; got {chunk_size}")
    dev = _device(model)
    z = SparseTensor(batched(latent.coords.to(dev)), latent.feats.to(dev, torch.float32), 1)
    if chunk_size is not None and chunk_size >= latent.resolution:
        chunk_size = None  # one chunk: plain decoding is the same and faster
    with autocast(dev, precision):
        decoding = model.decode(z, resolution=latent.resolution, chunk_size=chunk_size, prune=prune,
                                chunking=chunking)
    decoding.head = decoding.head.float()
    sf = decoding.sparseflex(0)
    ex = sf.extract()
    vertices = ex.vertices if latent.transform is None else latent.transform.invert(ex.vertices)
    return Reconstruction(sf, Mesh(vertices.detach(), ex.faces), latent)


def reconstruct(model: SparseFlexVAE, mesh: Mesh, num_points: int | None = None, seed: int = 0,
                resolution: int | None = None, chunk_size: int | None = None, metrics: bool = True,
                metrics_points: int = 300_000, prune: bool | None = None, chunking: str = "whole",
                sample: bool = False, precision: str = "fp32") -> Reconstruction:
    """Encode and decode ``mesh``; with ``metrics``, the result's Chamfer / F-score / normal consistency against it
    (:func:`sparseflex.eval.metrics.mesh_metrics`). ``sample``, ``prune``, ``chunking`` and ``precision`` as in
    :func:`encode_mesh` and :func:`decode_latent`."""
    latent = encode_mesh(model, mesh, num_points, seed, resolution, sample, precision)
    result = decode_latent(model, latent, chunk_size, prune, chunking, precision)
    if metrics:
        from ..eval.metrics import mesh_metrics
        result.metrics = mesh_metrics(result.mesh, mesh, num_points=metrics_points, seed=seed)
    return result


# -- latent files ------------------------------------------------------------------------------------------------------

def save_latent(path: str | os.PathLike, latent: Latent) -> Path:
    """Write a latent as safetensors, atomically."""
    from safetensors.torch import save_file
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"coords": latent.coords.detach().cpu().long().contiguous(),
               "feats": latent.feats.detach().cpu().float().contiguous()}
    metadata = {"format": LATENT_FORMAT, "resolution": str(latent.resolution)}
    if latent.transform is not None:
        tensors["center"] = latent.transform.center.detach().cpu().double().reshape(3)
        metadata["scale"] = json.dumps(latent.transform.scale)
    with atomic_path(p) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return p


def load_latent(path: str | os.PathLike) -> Latent:
    """Read a latent written by :func:`save_latent` (one-line InputError for anything else)."""
    from safetensors import safe_open
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such latent file")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - the file cannot be used, whatever the reason
        raise InputError(f"{p}: not a readable latent file ({exc})".splitlines()[0]) from None
    if metadata.get("format") != LATENT_FORMAT or "coords" not in tensors or "feats" not in tensors:
        raise InputError(f"{p}: not a SparseFlex latent (written by `sparseflex encode`)")
    coords, feats = tensors["coords"], tensors["feats"]
    r = int(metadata.get("resolution", 0))
    if coords.dim() != 2 or coords.shape[1] != 3 or len(coords) != len(feats) or r < 1:
        raise InputError(f"{p}: malformed latent (coords {tuple(coords.shape)}, feats {tuple(feats.shape)})")
    if len(coords) and (int(coords.min()) < 0 or int(coords.max()) >= r):
        raise InputError(f"{p}: latent voxel coordinates outside [0, {r})")
    transform = None
    if "center" in tensors:
        transform = Normalization(tensors["center"].float(), float(json.loads(metadata["scale"])))
    return Latent(coords, feats, r, transform)

"""Mesh -> latent -> SparseFlex -> mesh with a trained VAE: encode, decode (chunked at high resolution), reconstruct.

A :class:`~sparseflex.data.latents.Latent` keeps the normalisation of the mesh it came from, so decoding returns a mesh
in the input's coordinates; :func:`~sparseflex.data.latents.save_latent` / ``load_latent`` write and read it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..data.latents import Latent, load_latent, save_latent  # noqa: F401 - the latent file API, re-exported
from ..data.mesh import Mesh, normalize
from ..errors import InputError, OptionError
from ..flexicubes.representation import SparseFlex
from ..models.inputs import mesh_inputs
from ..models.vae import SparseFlexVAE
from ..nn import SparseTensor
from ..sparse.coords import batched



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

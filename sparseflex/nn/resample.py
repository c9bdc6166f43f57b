"""Changing resolution: subdivide (x2, copy), downsample (mean or max) and upsample back to cached fine voxels."""

from __future__ import annotations

import torch

from ..errors import InputError, OptionError
from ..sparse.coords import downsample, subdivide
from .sparse_tensor import SparseTensor


def sparse_subdivide(x: SparseTensor) -> SparseTensor:
    """Each voxel becomes its 8 children at twice the resolution, copying its features.

    Rows are voxel-major: child ``i`` of voxel ``n`` is row ``8 n + i`` at offset ``CORNER_OFFSETS[i]`` (x fastest).
    """
    return SparseTensor(subdivide(x.coords), x.feats.repeat_interleave(8, dim=0), x.batch_size)


def segment_reduce(feats: torch.Tensor, index: torch.Tensor, size: int, reduce: str = "mean") -> torch.Tensor:
    """Reduce rows of ``feats`` that share ``index`` into ``[size, C]`` by mean or max (empty rows are 0)."""
    out = feats.new_zeros(size, feats.shape[1])
    if reduce == "mean":
        counts = torch.bincount(index, minlength=size).clamp(min=1).to(feats.dtype)
        return out.index_add(0, index, feats) / counts[:, None]
    if reduce == "max":
        return out.scatter_reduce(0, index[:, None].expand_as(feats), feats, "amax", include_self=False)
    raise OptionError(f"reduce must be 'mean' or 'max'; got {reduce!r}")


def sparse_downsample(x: SparseTensor, factor: int = 2, reduce: str = "mean") -> SparseTensor:
    """Pool voxels into their parents at ``1/factor`` resolution (mean by default).

    The result remembers ``x``'s voxels, so :func:`sparse_upsample` can return to them.
    """
    if factor < 1:
        raise OptionError(f"downsampling factor must be >= 1; got {factor}")
    parents, parent_of = downsample(x.coords, factor)
    out = SparseTensor(parents, segment_reduce(x.feats, parent_of, len(parents), reduce), x.batch_size)
    out.cache[("upsample", factor)] = (x.coords, x.cache, parent_of)
    return out


def sparse_upsample(x: SparseTensor, factor: int = 2, target: SparseTensor | None = None) -> SparseTensor:
    """Copy each coarse voxel's features to its children.

    Without ``target`` the children are the fine voxels ``x`` was downsampled from (cached by
    :func:`sparse_downsample`); with ``target`` they are ``target``'s voxels, whose parents must all be in ``x``.
    """
    if target is None:
        fine = x.cache.get(("upsample", factor))
        if fine is None:
            raise InputError(f"no cached fine voxels for upsampling by {factor}: pass target=")
        coords, cache, parent_of = fine
        return SparseTensor(coords, x.feats.index_select(0, parent_of), cache=cache)
    parents = target.coords.clone()
    parents[:, 1:] = torch.div(parents[:, 1:], factor, rounding_mode="floor")
    parent_of = x.hash.lookup(parents)
    if bool((parent_of < 0).any()):
        raise InputError(f"{int((parent_of < 0).sum())} target voxels have no parent in the coarse tensor")
    return target.replace(x.feats.index_select(0, parent_of))

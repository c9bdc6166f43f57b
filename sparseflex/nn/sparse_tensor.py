"""The one sparse type the network speaks: integer voxel coordinates plus a feature row per voxel.

Rows are kept sorted by batch index, so sample ``b`` owns the contiguous rows ``layout[b]``. Everything derived from
the coordinates alone (hash table, convolution pairs, attention windows, the fine level of a downsampling) lives in
``cache``, a dict shared by every tensor built on the same coordinates through :meth:`SparseTensor.replace`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputError
from ..sparse.coords import VoxelHash, batched


class SparseTensor:
    """Features ``feats [N, C]`` on voxels ``coords [N, 4]`` (int64 ``(batch, x, y, z)``), rows sorted by batch."""

    def __init__(self, coords: torch.Tensor, feats: torch.Tensor, batch_size: int | None = None,
                 cache: dict | None = None):
        if feats.dim() != 2:
            raise InputError(f"sparse features must be [N, C]; got {tuple(feats.shape)}")
        if cache is None:
            if coords.is_floating_point() or coords.dim() != 2 or coords.shape[-1] not in (3, 4):
                raise InputError(f"sparse coordinates must be integer [N, 4]; got {coords.dtype} {tuple(coords.shape)}")
            coords = batched(coords)
            b = coords[:, 0]
            if len(b) and bool((b[0] < 0) | (b[1:] < b[:-1]).any()):
                raise InputError("sparse rows must be sorted by batch index (use SparseTensor.from_unsorted)")
            inferred = int(b[-1]) + 1 if len(b) else 0
            if batch_size is None:
                batch_size = inferred
            elif batch_size < inferred:
                raise InputError(f"batch_size {batch_size} is smaller than the largest batch index + 1 ({inferred})")
            cache = {"batch_size": batch_size}
        if len(feats) != len(coords):
            raise InputError(f"{len(coords)} coordinates but {len(feats)} feature rows")
        if feats.device != coords.device:
            raise InputError(f"coordinates on {coords.device} but features on {feats.device}")
        self.coords = coords
        self.feats = feats
        self.cache = cache

    @classmethod
    def from_unsorted(cls, coords: torch.Tensor, feats: torch.Tensor,
                      batch_size: int | None = None) -> tuple["SparseTensor", torch.Tensor]:
        """Sort rows by batch (stable) and return the tensor and the row order used (``new = old[order]``)."""
        coords = batched(coords)
        order = torch.sort(coords[:, 0], stable=True).indices
        return cls(coords[order], feats[order], batch_size), order

    # ---- shape and layout -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.coords)

    def __repr__(self) -> str:
        return (f"SparseTensor(voxels={len(self)}, channels={self.feats.shape[1]}, batch_size={self.batch_size}, "
                f"dtype={self.dtype}, device={self.device})")

    @property
    def shape(self) -> torch.Size:
        return self.feats.shape

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def batch_size(self) -> int:
        return self.cache["batch_size"]

    @property
    def batch_index(self) -> torch.Tensor:
        """``[N]`` batch index of each row."""
        return self.coords[:, 0]

    def cached(self, key, build: Callable):
        """The cached value for ``key`` on these coordinates, built by ``build()`` the first time."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    @property
    def offsets(self) -> torch.Tensor:
        """``[B + 1]`` row offsets: sample ``b`` owns rows ``offsets[b]:offsets[b + 1]``."""
        def build():
            counts = torch.bincount(self.batch_index, minlength=self.batch_size)
            return torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return self.cached("offsets", build)

    @property
    def layout(self) -> list[slice]:
        """Row slice of every sample (host-side, one device sync the first time)."""
        def build():
            o = self.offsets.tolist()
            return [slice(o[b], o[b + 1]) for b in range(self.batch_size)]
        return self.cached("layout", build)

    @property
    def hash(self) -> VoxelHash:
        """Lookup table of these coordinates (rows are returned as indices into this tensor)."""
        return self.cached("hash", lambda: VoxelHash(self.coords))

    # ---- derived tensors ----------------------------------------------------------------------------------

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        """Same voxels (and cache), new features."""
        return SparseTensor(self.coords, feats, cache=self.cache)

    def select(self, rows: torch.Tensor) -> "SparseTensor":
        """The voxels picked by a boolean mask or an increasing index (a new coordinate set)."""
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)
        return SparseTensor(self.coords[rows], self.feats[rows], self.batch_size)

    def to(self, device=None, dtype=None) -> "SparseTensor":
        """Move to ``device`` (a new cache there) and/or cast features to ``dtype``."""
        feats = self.feats.to(device=device, dtype=dtype)
        if feats.device == self.device:
            return self.replace(feats)
        return SparseTensor(self.coords.to(feats.device), feats, self.batch_size)

    def per_sample(self, values: torch.Tensor) -> torch.Tensor:
        """Broadcast per-sample rows ``values [B, ...]`` to every voxel: ``[N, ...]``."""
        if len(values) != self.batch_size:
            raise InputError(f"expected {self.batch_size} per-sample rows; got {len(values)}")
        return values.index_select(0, self.batch_index)

    def split(self) -> list[torch.Tensor]:
        """Features of each sample."""
        return [self.feats[s] for s in self.layout]

    # ---- feature-wise arithmetic ------------------------------------------------------------------------------

    def _operand(self, other):
        if isinstance(other, SparseTensor):
            if other.cache is not self.cache and not (other.coords.shape == self.coords.shape
                                                      and torch.equal(other.coords, self.coords)):
                raise InputError("sparse tensors with different coordinates cannot be combined")
            return other.feats
        return other

    def __add__(self, other):
        return self.replace(self.feats + self._operand(other))

    def __sub__(self, other):
        return self.replace(self.feats - self._operand(other))

    def __mul__(self, other):
        return self.replace(self.feats * self._operand(other))

    def __truediv__(self, other):
        return self.replace(self.feats / self._operand(other))

    def __neg__(self):
        return self.replace(-self.feats)

    __radd__ = __add__
    __rmul__ = __mul__

    def __rsub__(self, other):
        return self.replace(self._operand(other) - self.feats)


def sparse_cat(tensors: list[SparseTensor]) -> SparseTensor:
    """Concatenate features of tensors on the same voxels along channels."""
    first = tensors[0]
    return first.replace(torch.cat([first._operand(t) for t in tensors], dim=1))

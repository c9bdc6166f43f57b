"""Integer voxel coordinates on any device: int64 keys, hashing by sort + searchsorted, corner lattices,
subdivision, downsampling and dilation.

Coordinates are ``[N, 4]`` int64 tensors ``(batch, x, y, z)``; ``[N, 3]`` tensors are taken as batch 0.
Every set operation works on one linearised int64 key per voxel (never ``unique(dim=0)``, which is slow).
"""

from __future__ import annotations

import itertools

import torch

COORD_BITS = 16
_SPAN = 1 << COORD_BITS
_OFFSET = 1 << (COORD_BITS - 1)  # x, y, z may lie in [-32768, 32767] (shifted windows, dilation at the border)
MAX_BATCH = 1 << (63 - 3 * COORD_BITS)

#: Corner i of a voxel sits at (i & 1, (i >> 1) & 1, (i >> 2) & 1): x fastest (SPEC section 1).
CORNER_OFFSETS = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=torch.long)


def batched(coords: torch.Tensor) -> torch.Tensor:
    """Return ``[N, 4]`` int64 coordinates, prepending batch 0 to ``[N, 3]`` input."""
    coords = coords.long()
    if coords.dim() != 2 or coords.shape[1] not in (3, 4):
        raise ValueError(f"coordinates must be [N, 3] or [N, 4]; got {tuple(coords.shape)}")
    if coords.shape[1] == 3:
        coords = torch.cat([coords.new_zeros(len(coords), 1), coords], dim=1)
    return coords


def coords_to_keys(coords: torch.Tensor) -> torch.Tensor:
    """One int64 key per voxel, ordered by (batch, x, y, z)."""
    c = batched(coords)
    xyz = c[:, 1:] + _OFFSET
    return ((c[:, 0] * _SPAN + xyz[:, 0]) * _SPAN + xyz[:, 1]) * _SPAN + xyz[:, 2]


def keys_to_coords(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`coords_to_keys`: ``[N, 4]`` coordinates."""
    z = keys % _SPAN - _OFFSET
    rest = keys // _SPAN
    y = rest % _SPAN - _OFFSET
    rest = rest // _SPAN
    x = rest % _SPAN - _OFFSET
    b = rest // _SPAN
    return torch.stack([b, x, y, z], dim=1)


class VoxelHash:
    """A coordinate set prepared for lookups: sorted keys plus the permutation back to the original rows."""

    def __init__(self, coords: torch.Tensor):
        keys = coords_to_keys(coords)
        self.sorted_keys, self.order = torch.sort(keys)

    def __len__(self) -> int:
        return len(self.sorted_keys)

    def lookup_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Row index of each key in the original coordinates, or -1 where absent (any shape)."""
        if len(self.sorted_keys) == 0:
            return torch.full_like(keys, -1)
        pos = torch.searchsorted(self.sorted_keys, keys.reshape(-1)).clamp_(max=len(self.sorted_keys) - 1)
        found = self.sorted_keys[pos] == keys.reshape(-1)
        return torch.where(found, self.order[pos], torch.full_like(pos, -1)).reshape(keys.shape)

    def lookup(self, coords: torch.Tensor) -> torch.Tensor:
        """Row index of each ``[..., 4]`` (or ``[..., 3]``) coordinate, -1 where absent."""
        shape = coords.shape[:-1]
        return self.lookup_keys(coords_to_keys(coords.reshape(-1, coords.shape[-1]))).reshape(shape)


def unique_coords(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique coordinates (sorted by key) and, for each input row, its row in the result."""
    keys, inverse = torch.unique(coords_to_keys(coords), return_inverse=True)
    return keys_to_coords(keys), inverse


def kernel_offsets(size: int = 3, device=None) -> torch.Tensor:
    """``[size^3, 3]`` offsets; row ``(i * size + j) * size + k`` is ``(i, j, k) - size // 2``."""
    r = range(size)
    offs = torch.tensor(list(itertools.product(r, r, r)), dtype=torch.long, device=device)
    return offs - size // 2


def neighbour_map(coords: torch.Tensor, offsets: torch.Tensor, table: VoxelHash | None = None) -> torch.Tensor:
    """``[N, K]`` row index of the voxel at ``coords[n] + offsets[k]`` (same batch), -1 where not active."""
    keys = coords_to_keys(coords)
    table = table or VoxelHash(coords)
    return table.lookup_keys(keys[:, None] + _offset_keys(offsets.to(keys.device))[None])


def _offset_keys(offsets: torch.Tensor) -> torch.Tensor:
    """Key difference of integer ``[K, 3]`` offsets: keys are linear in the coordinates, so neighbours' keys are
    ``key + delta`` (valid while the shifted coordinates stay inside the key range)."""
    return (offsets[:, 0] * _SPAN + offsets[:, 1]) * _SPAN + offsets[:, 2]


def corner_lattice(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique corners of the voxels and each voxel's 8 corner rows.

    Returns ``corners [Nc, 4]`` (integer corner coordinates in ``[0, R]``) and ``voxel_corners [N, 8]``, where
    column i is corner i in the SPEC order.
    """
    keys = coords_to_keys(coords)
    corner_keys = keys[:, None] + _offset_keys(CORNER_OFFSETS.to(keys.device))[None]  # no [8N, 4] temporary
    unique_keys, inverse = torch.unique(corner_keys.reshape(-1), return_inverse=True)
    return keys_to_coords(unique_keys), inverse.reshape(-1, 8)


def subdivide(coords: torch.Tensor) -> torch.Tensor:
    """Each voxel's 8 children at twice the resolution, ``[8N, 4]``, voxel-major, child i at corner offset i."""
    c = batched(coords)
    off = torch.cat([CORNER_OFFSETS.new_zeros(8, 1), CORNER_OFFSETS], dim=1).to(c.device)
    parent = c * torch.tensor([1, 2, 2, 2], device=c.device)
    return (parent[:, None, :] + off[None]).reshape(-1, 4)


def downsample(coords: torch.Tensor, factor: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Parent voxels at ``1/factor`` resolution and each input voxel's parent row."""
    c = batched(coords).clone()
    c[:, 1:] = torch.div(c[:, 1:], factor, rounding_mode="floor")
    return unique_coords(c)


#: Neighbour keys :func:`dilate` forms at once (about 60 MB of int64).
_DILATE_CHUNK = 1 << 23


def dilate(coords: torch.Tensor, radius: int = 1, resolution: int | None = None) -> torch.Tensor:
    """All voxels within Chebyshev distance ``radius`` of a voxel in the set, clipped to ``[0, resolution)``."""
    keys = coords_to_keys(coords)
    if radius > 0:
        delta = _offset_keys(kernel_offsets(2 * radius + 1, keys.device))
        # chunk by chunk of sorted keys (neighbouring slabs of the grid), so that the [n, K] neighbour keys and
        # their sort stay small (all at once: about 0.9 KB per voxel at K = 27); chunks overlap only where they meet
        keys = torch.sort(keys).values
        chunk = max(_DILATE_CHUNK // len(delta), 1)
        parts = [torch.unique(keys[i:i + chunk, None] + delta[None]) for i in range(0, len(keys), chunk)]
        keys = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
    grown = keys_to_coords(torch.unique(keys))
    if resolution is not None:
        grown = grown[((grown[:, 1:] >= 0) & (grown[:, 1:] < resolution)).all(dim=1)]
    return grown


def dense_grid(resolution: int, device=None) -> torch.Tensor:
    """Every voxel of a ``resolution^3`` grid as ``[R^3, 4]`` coordinates (batch 0), x slowest."""
    r = torch.arange(resolution, device=device)
    g = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
    return batched(g)

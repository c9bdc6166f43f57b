"""The file format of one prepared item: a compressed ``.npz`` of compact arrays, and its reader.

Arrays (P points, N latent voxels, M_l occupied voxels per level, V views of S x S pixels):

- ``points_q`` uint16 [P, 3]: surface points of the normalised mesh, quantised on [-0.5, 0.5] in 65,535 steps
  (error < 8e-6, under 1 % of a voxel at 1024^3: float16 would be 30 times coarser near the cube's faces), grouped
  by latent voxel (draw random subsets, not the first rows);
- ``normals`` float16 [P, 3]: their unit face normals;
- ``coords`` int16 [N, 3]: active voxels at the latent resolution (sorted, x slowest);
- ``children_<r>`` uint8 [M_{l-1}]: per voxel of the previous level (``coords`` first), the bit mask of its 8
  children at resolution ``r`` that are occupied (bit i = child at corner offset i, SPEC section 1): the pruning
  targets, 1 byte per parent instead of 6 per child, which keeps items small;
- ``vertices`` float32 [V, 3], ``faces`` int32 [F, 3]: the normalised mesh;
- ``images`` uint8 [V, S, S, 4]: shaded RGB renders with alpha = coverage, ``K`` float32 [V, 3, 3] and
  ``extrinsics`` float32 [V, 4, 4] (OpenCV, world to camera, normalised frame), ``near`` / ``far`` float32 [V];
- ``center`` float64 [3], ``scale`` float64 []: the normalisation ``x -> (x - center) * scale`` of the source file;
- ``resolution`` int [] and ``levels`` int [L]: the latent and occupancy resolutions.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..render.camera import Camera
from ..sparse.coords import VoxelHash, coords_to_keys, subdivide
from .manifest import write_atomic
from .mesh import Mesh

_QMAX = 65535


def quantize_points(points: torch.Tensor) -> np.ndarray:
    """Points in [-0.5, 0.5]^3 -> uint16 grid codes."""
    q = torch.round((points.detach().double().cpu() + 0.5).clamp(0, 1) * _QMAX)
    return q.numpy().astype(np.uint16)


def dequantize_points(q: np.ndarray) -> torch.Tensor:
    """uint16 grid codes -> float32 points in [-0.5, 0.5]^3."""
    return torch.from_numpy((q.astype(np.float64) / _QMAX - 0.5).astype(np.float32))


def child_masks(parents: torch.Tensor, children: torch.Tensor) -> np.ndarray:
    """uint8 ``[N]``: bit i of entry n is set when child i (corner offset i) of ``parents[n]`` is in ``children``
    (``[M, 3]`` at twice the resolution, each inside some parent)."""
    index = VoxelHash(parents).lookup(torch.div(children, 2, rounding_mode="floor"))
    if (index < 0).any():
        raise ValueError("an occupied child lies outside every parent voxel")
    bit = (children[:, 0] & 1) | (children[:, 1] & 1) << 1 | (children[:, 2] & 1) << 2
    masks = torch.zeros(len(parents), dtype=torch.long).index_add_(0, index, 1 << bit)  # distinct bits: sum = or
    return masks.numpy().astype(np.uint8)


def expand_children(parents: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`child_masks`: the occupied children ``[M, 3]``, sorted (x slowest)."""
    bits = (torch.from_numpy(masks.astype(np.int64))[:, None] >> torch.arange(8)) & 1
    children = subdivide(parents)[bits.reshape(-1).bool(), 1:]
    return children[torch.argsort(coords_to_keys(children))]


def save_item(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> int:
    """Write the arrays as a compressed ``.npz`` atomically; return the file size in bytes."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_atomic(Path(path), buffer.getvalue())
    return len(buffer.getvalue())


def load_item(path: str | os.PathLike, with_images: bool = False) -> dict:
    """Read a prepared item as tensors (the layout of :class:`~sparseflex.data.dataset.PreparedDataset` items)."""
    with np.load(path) as z:
        levels = [int(r) for r in z["levels"]]
        item = {"points": dequantize_points(z["points_q"]),
                "normals": torch.from_numpy(z["normals"].astype(np.float32)),
                "coords": torch.from_numpy(z["coords"].astype(np.int64)),
                "occupancy": [],
                "vertices": torch.from_numpy(z["vertices"]),
                "faces": torch.from_numpy(z["faces"].astype(np.int64)),
                "resolution": int(z["resolution"]),
                "levels": levels}
        parents = item["coords"]
        for r in levels:
            parents = expand_children(parents, z[f"children_{r}"])
            item["occupancy"].append(parents)
        if with_images:
            if "images" not in z.files:
                raise InputError(f"{path}: no conditioning images (prepared with --views 0)")
            images = z["images"]
            item["images"] = torch.from_numpy(images)
            item["cameras"] = Camera(torch.from_numpy(z["K"]), torch.from_numpy(z["extrinsics"]), images.shape[2],
                                     images.shape[1], torch.from_numpy(z["near"]), torch.from_numpy(z["far"]))
    return item


def item_mesh(item: dict) -> Mesh:
    return Mesh(item["vertices"], item["faces"])

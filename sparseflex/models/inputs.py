"""Encoder inputs from a mesh or an oriented point cloud (SPEC section 4).

Surface points with their normals, and the active latent voxels: the voxels the triangles touch plus those the
points reach when moved by up to ``jitter`` latent voxels on each axis (about one voxel of the output resolution),
so that the decoder's children can cover surface lying just across a latent voxel face.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.mesh import Mesh
from ..data.sampling import sample_surface
from ..data.voxelize import active_voxels
from ..errors import InputError, OptionError
from ..sparse.coords import batched


@dataclass
class EncoderInputs:
    """One shape ready for :meth:`SparseFlexVAE.encode`: ``points``, ``normals`` ``[P, 3]``, ``point_batch [P]``
    (zeros) and active voxels ``coords [N, 4]`` at ``resolution``."""
    points: torch.Tensor
    normals: torch.Tensor
    point_batch: torch.Tensor
    coords: torch.Tensor
    resolution: int


def point_inputs(points: torch.Tensor, normals: torch.Tensor, resolution: int, jitter: float = 0.25,
                 mesh: Mesh | None = None) -> EncoderInputs:
    """Encoder inputs of an oriented point cloud in the cube [-0.5, 0.5]^3 (plus the voxels ``mesh``'s triangles
    touch, when given)."""
    if points.dim() != 2 or points.shape[1] != 3 or points.shape != normals.shape or len(points) == 0:
        raise InputError(f"points and normals must be matching non-empty [P, 3]; got {tuple(points.shape)} and "
                         f"{tuple(normals.shape)}")
    if not bool(torch.isfinite(points).all() & torch.isfinite(normals).all()):
        raise InputError("points or normals contain NaN or infinity")
    coords = active_voxels(mesh, points, resolution, jitter)
    return EncoderInputs(points.float(), normals.float(), torch.zeros(len(points), dtype=torch.long,
                         device=points.device), batched(coords), resolution)


def mesh_inputs(mesh: Mesh, resolution: int, num_points: int, seed: int = 0, jitter: float = 0.25) -> EncoderInputs:
    """Encoder inputs of a NORMALISED mesh: ``num_points`` uniform surface samples with face normals."""
    if num_points < 1:
        raise OptionError(f"num_points must be positive; got {num_points}")
    gen = torch.Generator().manual_seed(seed)
    points, normals, _ = sample_surface(mesh, num_points, generator=gen)
    return point_inputs(points.detach(), normals, resolution, jitter, mesh)

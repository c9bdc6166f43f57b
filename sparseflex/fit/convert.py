"""Mesh -> SparseFlex without optimisation: voxelise the surface, take the SDF from oriented points, extract.

This is the initialisation of ``sparseflex fit`` and the ``sparseflex convert`` command.
"""

from __future__ import annotations

import torch

from ..data.mesh import Mesh
from ..data.sampling import sample_surface
from ..data.voxelize import voxelize
from ..flexicubes.init_sdf import oriented_point_sdf
from ..flexicubes.representation import SparseFlex


def default_num_points(num_voxels: int) -> int:
    """Enough samples that every surface voxel holds several (the nearest-sample SDF is then sub-voxel accurate)."""
    return int(min(max(8 * num_voxels, 200_000), 16_000_000))


def mesh_to_sparseflex(mesh: Mesh, resolution: int, dilation: int = 1, num_points: int | None = None,
                       seed: int = 0) -> SparseFlex:
    """SparseFlex of a NORMALISED mesh: voxels the triangles touch (dilated), corner SDF from oriented points."""
    coords = voxelize(mesh, resolution, dilation=dilation).to(mesh.vertices.device)
    n = num_points or default_num_points(len(coords))
    gen = torch.Generator().manual_seed(seed)
    points, normals, _ = sample_surface(mesh, n, generator=gen)
    return SparseFlex.from_sdf(coords, resolution, lambda pos: oriented_point_sdf(pos, points, normals))

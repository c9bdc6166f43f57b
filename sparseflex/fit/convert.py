"""Mesh -> SparseFlex without optimisation: voxelise the surface, take the SDF from oriented points, extract.

This is the initialisation of ``sparseflex fit`` and the ``sparseflex convert`` command.
"""

from __future__ import annotations

import torch

from ..data.mesh import Mesh
from ..data.sampling import sample_surface
from ..data.voxelize import voxelize
from ..flexicubes.init_sdf import nearest_oriented, oriented_point_sdf
from ..sparse.coords import dilate
from ..flexicubes.representation import SparseFlex


def default_num_points(num_voxels: int) -> int:
    """Enough samples that every surface voxel holds several (the nearest-sample SDF is then sub-voxel accurate)."""
    return int(min(max(16 * num_voxels, 200_000), 24_000_000))


def mesh_to_sparseflex(mesh: Mesh, resolution: int, dilation: int = 1, num_points: int | None = None,
                       seed: int = 0, max_lateral: float = 0.75) -> SparseFlex:
    """SparseFlex of a NORMALISED mesh: voxels the triangles touch (dilated), corner SDF from oriented points.

    Dilation may step one voxel outside [0, R): a normalised mesh touches the cube's faces, and without that apron
    the crossing edges lying on the cube's faces would lack voxels and leave holes at the extremities.
    ``max_lateral`` (in voxels) bounds how far sideways of the nearest surface sample a voxel centre may lie.
    """
    coords = voxelize(mesh, resolution).to(mesh.vertices.device)
    if dilation > 0:
        coords = dilate(coords, dilation)
        coords = coords[((coords[:, 1:] >= -1) & (coords[:, 1:] <= resolution)).all(1)]
    n = num_points or default_num_points(len(coords))
    gen = torch.Generator().manual_seed(seed)
    points, normals, _ = sample_surface(mesh, n, generator=gen)
    # Past an open boundary the nearest sample lies sideways of a voxel: drop such voxels, so the surface ends
    # there (open) instead of continuing the tangent plane through the dilated band.
    centres = (coords[:, 1:].to(points.dtype) + 0.5) / resolution - 0.5
    _, lateral = nearest_oriented(centres, points, normals)
    coords = coords[lateral <= max_lateral / resolution]
    return SparseFlex.from_sdf(coords, resolution, lambda pos: oriented_point_sdf(pos, points, normals))

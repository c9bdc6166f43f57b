"""Mesh -> SparseFlex without optimisation: voxelise the surface, take the SDF from oriented points, extract.

This is the initialisation of ``sparseflex fit`` and the ``sparseflex convert`` command.
"""

from __future__ import annotations

import torch

from ..data.mesh import Mesh
from ..data.sampling import sample_surface
from ..data.voxelize import voxelize
from ..flexicubes.init_sdf import nearest_oriented, oriented_point_sdf
from ..flexicubes.representation import SparseFlex
from ..sparse.coords import batched, dilate


def default_num_points(num_voxels: int) -> int:
    """Enough samples that every surface voxel holds several (the nearest-sample SDF is then sub-voxel accurate)."""
    return int(min(max(16 * num_voxels, 200_000), 24_000_000))


def surface_band(mesh: Mesh, resolution: int, points: torch.Tensor, normals: torch.Tensor, dilation: int = 1,
                 max_lateral: float = 0.75) -> torch.Tensor:
    """The voxels ``[N, 4]`` a SparseFlex of a NORMALISED mesh needs at ``resolution``.

    The voxels the triangles touch, dilated; dilation may step one voxel outside [0, R), because a normalised mesh
    touches the cube's faces and the crossing edges on them would otherwise lack voxels (holes at the extremities).
    Voxels whose centre lies more than ``max_lateral`` voxels sideways of the nearest surface sample ``points`` are
    dropped: past an open boundary the surface then ends (open) instead of continuing its tangent plane.
    """
    coords = batched(voxelize(mesh, resolution).to(points.device))
    if dilation > 0:
        coords = dilate(coords, dilation)
        coords = coords[((coords[:, 1:] >= -1) & (coords[:, 1:] <= resolution)).all(1)]
    centres = (coords[:, 1:].to(points.dtype) + 0.5) / resolution - 0.5
    _, lateral = nearest_oriented(centres, points, normals)
    return coords[lateral <= max_lateral / resolution]


def mesh_to_sparseflex(mesh: Mesh, resolution: int, dilation: int = 1, num_points: int | None = None,
                       seed: int = 0, max_lateral: float = 0.75,
                       samples: tuple[torch.Tensor, torch.Tensor] | None = None) -> SparseFlex:
    """SparseFlex of a NORMALISED mesh: the :func:`surface_band` voxels, corner SDF from oriented points.

    ``samples`` (points, normals) reuses a surface sample already drawn; otherwise ``num_points`` are drawn (by
    default enough for the resolution)."""
    if samples is not None:
        points, normals = samples
    else:
        if num_points is None:  # size the sample to the voxel count, estimated from the surface area
            num_points = default_num_points(int(2 * mesh.area * resolution ** 2 * (1 + 2 * dilation)))
        gen = torch.Generator().manual_seed(seed)
        points, normals, _ = sample_surface(mesh, num_points, generator=gen)
    coords = surface_band(mesh, resolution, points, normals, dilation, max_lateral)
    return SparseFlex.from_sdf(coords, resolution, lambda pos: oriented_point_sdf(pos, points, normals))

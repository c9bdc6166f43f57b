"""Mesh -> SparseFlex without optimisation: voxelise the surface, take the SDF from oriented points, keep the
features thinner than a voxel, extract.

This is the initialisation of ``sparseflex fit`` and the ``sparseflex convert`` command.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.mesh import Mesh
from ..data.sampling import sample_surface
from ..data.voxelize import voxelize
from ..flexicubes.init_sdf import OrientedPoints
from ..flexicubes.representation import SparseFlex, deform_for
from ..render.visibility import cast_rays, embree_available
from ..sparse.coords import batched, dilate
from .stream import TiledPoints


def default_num_points(num_voxels: int) -> int:
    """Enough samples that every surface voxel holds several (the nearest-sample SDF is then sub-voxel accurate)."""
    return int(min(max(16 * num_voxels, 200_000), 24_000_000))


def surface_band(mesh: Mesh, resolution: int, samples: OrientedPoints, dilation: int = 1,
                 max_lateral: float = 0.75) -> torch.Tensor:
    """The voxels ``[N, 4]`` a SparseFlex of a NORMALISED mesh needs at ``resolution``.

    The voxels the triangles touch, dilated; dilation may step one voxel outside [0, R), because a normalised mesh
    touches the cube's faces and the crossing edges on them would otherwise lack voxels (holes at the extremities).
    Voxels whose centre lies more than ``max_lateral`` voxels sideways of the nearest surface sample are
    dropped: past an open boundary the surface then ends (open) instead of continuing its tangent plane.
    """
    points = samples.points
    coords = batched(voxelize(mesh, resolution).to(points.device))
    if dilation > 0:
        coords = dilate(coords, dilation)
        coords = coords[((coords[:, 1:] >= -1) & (coords[:, 1:] <= resolution)).all(1)]
    centres = (coords[:, 1:].to(points.dtype) + 0.5) / resolution - 0.5
    _, lateral = samples.nearest(centres)
    return coords[lateral <= max_lateral / resolution]


def mesh_to_sparseflex(mesh: Mesh, resolution: int, dilation: int = 1, num_points: int | None = None,
                       seed: int = 0, max_lateral: float = 0.75,
                       samples: OrientedPoints | None = None,
                       thin_sheets: bool = True) -> SparseFlex:
    """SparseFlex of a NORMALISED mesh: the :func:`surface_band` voxels, corner SDF from oriented points.

    ``samples`` reuses a surface sample already drawn (with its KD-trees); otherwise ``num_points`` are drawn (by
    default enough for the resolution). ``thin_sheets`` keeps plates and gaps thinner than a voxel by moving the
    corners next to them onto their mid-sheet (:meth:`OrientedPoints.thin_sheets`); where two sheets coincide
    (touching parts, double-sided cloth) rays through the mesh decide which side is solid (needs Embree)."""
    oriented = samples
    if oriented is None:
        if num_points is None:  # size the sample to the voxel count, estimated from the surface area
            num_points = default_num_points(int(2 * mesh.area * resolution ** 2 * (1 + 2 * dilation)))
        gen = torch.Generator().manual_seed(seed)
        oriented = TiledPoints(*sample_surface(mesh, num_points, generator=gen)[:2])  # streamed: same SDF
    coords = surface_band(mesh, resolution, oriented, dilation, max_lateral)
    sf = SparseFlex.from_sdf(coords, resolution, oriented.sdf)
    if thin_sheets:
        side = solid_side_by_rays(mesh) if embree_available() else None
        corner_pos = sf.corners[:, 1:].to(oriented.points.dtype) / resolution - 0.5
        idx, sdf, disp = oriented.thin_sheets(corner_pos, resolution, side)
        sf.sdf[idx] = sdf.to(sf.sdf)
        sf.deform[idx] = deform_for(disp.to(sf.deform), resolution)
    return sf


def solid_side_by_rays(mesh: Mesh, rays: int = 8):
    """``solid_side(points, normals)`` for :meth:`OrientedPoints.thin_sheets`: is each point inside a solid?

    ``rays`` rays leave each point within the plane of its (coincident) sheets, so they never hit those sheets;
    a ray whose first hit is a face turned away from it left a solid, one that escapes or meets a face turned
    towards it started in air. The majority decides, ties count as solid (touching parts are the common case)."""
    vertices = mesh.vertices.detach().cpu().numpy().astype(np.float32)
    faces = mesh.faces.cpu().numpy()
    face_normals = mesh.face_normals.detach().cpu().double().numpy()
    angles = np.arange(rays) * (2 * np.pi / rays)

    def solid_side(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        helper = np.where(np.abs(normals[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
        t1 = np.cross(normals, helper)
        t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
        t2 = np.cross(normals, t1)
        dirs = (np.cos(angles)[None, :, None] * t1[:, None] + np.sin(angles)[None, :, None] * t2[:, None])
        dirs = dirs.reshape(-1, 3)
        origins = np.repeat(points, rays, axis=0)
        prim = cast_rays(vertices, faces, origins.astype(np.float32), dirs.astype(np.float32),
                         np.full(len(origins), 4.0, np.float32))
        leaving = (prim >= 0) & ((face_normals[np.maximum(prim, 0)] * dirs).sum(1) > 0)
        return leaving.reshape(-1, rays).sum(1) * 2 >= rays

    return solid_side

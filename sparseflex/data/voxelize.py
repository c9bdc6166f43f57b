"""Exact sparse voxelisation of triangle meshes: every voxel a triangle touches, vectorised and chunked.

Voxel ``(i, j, k)`` at resolution ``R`` is the closed box ``[-0.5 + i/R, -0.5 + (i+1)/R]`` per axis; a voxel is
returned when it and a triangle share a point (touching counts). The test is the separating axis theorem with
Akenine-Moller's 13 axes, evaluated on every voxel of each triangle's bounding box. Those axes separate by
coordinate, which keeps the dense test cheap: the 3 box axes are the bounding box itself; the 9 edge axes
``unit_k x edge`` are the edge normals of the triangle projected onto a coordinate plane, so each pair of axes is
tested once on a 2D grid of columns; the plane axis ``n . (c - v0)`` is a sum of three 1D terms. Only the final AND
runs over the 3D box ``[T, A, B, D]``.

Triangles whose bounding box spans more than ``MAX_SPAN`` voxels on an axis are first split at edge midpoints
(the pieces cover exactly the triangle), which bounds the work per triangle; triangles are grouped by bounding-box
shape and processed in chunks of a fixed number of candidate voxels. Boxes are grown by ``1e-9`` voxel so rounding
never drops a voxel that a triangle touches exactly (faces lying on grid planes mark the voxels on both sides).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError, OptionError
from ..sparse.coords import VoxelHash, coords_to_keys, dilate, keys_to_coords
from .mesh import Mesh, as_vertices_faces

_EPS = 1e-9       # voxel units
_HALF = 0.5 + _EPS
#: Triangles spanning more voxels than this on an axis are split first.
MAX_SPAN = 8


def voxel_centers(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Centres ``[N, 3]`` (float32) of integer voxel coordinates ``[N, 3]`` or ``[N, 4]`` (last 3 columns)."""
    return (coords[:, -3:].to(torch.float32) + 0.5) / resolution - 0.5


def voxelize(mesh, resolution: int, dilation: int = 0, chunk: int = 1 << 22) -> torch.Tensor:
    """Every voxel of a NORMALISED mesh's (or ``(vertices, faces)``'s) triangles, as ``[N, 3]`` int64 coordinates.

    Voxels outside ``[0, R)^3`` are dropped. ``dilation`` grows the set by that Chebyshev radius (clipped to the
    grid). The result is sorted (x slowest) and lies on the vertices' device. ``chunk`` bounds the number of
    candidate voxels tested at once (memory, not the result).
    """
    if not 1 <= resolution <= 32767:
        raise OptionError(f"resolution must be in [1, 32767]; got {resolution}")
    if dilation < 0:
        raise OptionError(f"dilation must be >= 0; got {dilation}")
    vertices, faces = as_vertices_faces(mesh)
    if not bool(torch.isfinite(vertices).all()):
        raise InputError("cannot voxelise vertices with NaN or infinite coordinates")
    device = vertices.device
    keys = torch.zeros(0, dtype=torch.long, device=device)
    pending, size = [], 0
    block = 1 << 18
    for start in range(0, len(faces), block):
        tri = (vertices.detach().double()[faces[start:start + block]] + 0.5) * resolution  # voxel units
        for k in _triangle_voxel_keys(tri, resolution, chunk):
            pending.append(k)
            size += len(k)
            if size > 4 * chunk:  # merge duplicates now and then: neighbouring triangles share most voxels
                keys, pending, size = _unique(torch.cat([keys, *pending])), [], 0
    keys = _unique(torch.cat([keys, *pending]))
    r = resolution
    coords = torch.stack([keys // (r * r), (keys // r) % r, keys % r], dim=1)
    if dilation > 0:
        coords = dilate(coords, dilation, resolution)[:, 1:]
    return coords


def jittered_voxels(points: torch.Tensor, resolution: int, jitter: float) -> torch.Tensor:
    """Voxels ``[M, 3]`` (inside the grid) holding a point of some box ``p + [-jitter, jitter]^3`` (``jitter`` in
    voxels); for ``jitter < 1`` a box spans at most 2 voxels per axis, so 8 candidates per point cover it."""
    if not 0 <= jitter < 1:
        raise OptionError(f"jitter must be in [0, 1) voxels; got {jitter}")
    u = (points.detach().double() + 0.5) * resolution
    lo, hi = (u - jitter).floor().long(), (u + jitter).floor().long()
    keys = []
    for corner in range(8):
        pick = torch.tensor([(corner >> a) & 1 for a in range(3)], dtype=torch.bool, device=u.device)
        keys.append(coords_to_keys(torch.where(pick, hi, lo)))
    coords = keys_to_coords(torch.unique(torch.cat(keys)))[:, 1:]
    return coords[((coords >= 0) & (coords < resolution)).all(1)]


def active_voxels(mesh, points: torch.Tensor, resolution: int, jitter: float) -> torch.Tensor:
    """The VAE's input voxels ``[N, 3]`` (SPEC section 4, sorted): those the triangles of ``mesh`` touch (when given)
    plus :func:`jittered_voxels` of the surface ``points``. Data preparation and inference share this definition."""
    coords = jittered_voxels(points, resolution, jitter)
    if mesh is not None:
        coords = torch.cat([voxelize(mesh, resolution).to(coords.device), coords])
    return keys_to_coords(torch.unique(coords_to_keys(coords)))[:, 1:]


def _unique(keys: torch.Tensor) -> torch.Tensor:
    """Sorted unique int64 keys (numpy's sort is several times faster than torch's on the CPU)."""
    if keys.device.type != "cpu":
        return torch.unique(keys)
    k = np.sort(keys.numpy())
    return torch.from_numpy(k[np.concatenate([[True], k[1:] != k[:-1]])] if len(k) else k)


def _triangle_voxel_keys(tri: torch.Tensor, r: int, budget: int) -> list[torch.Tensor]:
    """Keys ``(x R + y) R + z`` of the voxels touched by triangles ``[T, 3, 3]`` in voxel units (may repeat)."""
    if len(tri) == 0:
        return []
    tri, lo, span = _split_large(tri, r)
    s = MAX_SPAN
    shape_key = ((span[:, 0] - 1) * s + span[:, 1] - 1) * s + span[:, 2] - 1
    shape_key, order = torch.sort(shape_key)
    tri, lo, span = tri[order], lo[order], span[order]
    shapes, counts = torch.unique_consecutive(shape_key, return_counts=True)
    out = []
    start = 0
    for count, (a, b, d) in zip(counts.tolist(), span[torch.cumsum(counts, 0) - 1].tolist()):
        step = max(1, budget // (a * b * d))
        for i in range(start, start + count, step):
            j = min(i + step, start + count)
            hit = _box_hits(tri[i:j] - lo[i:j, None, :], a, b, d)  # local coordinates: small numbers
            ijk = lo[i:j][hit[:, 3]] + hit[:, :3]
            out.append((ijk[:, 0] * r + ijk[:, 1]) * r + ijk[:, 2])
        start += count
    return out


def _bounds(tri: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First voxel and number of voxels per axis of each triangle's (grown) bounding box, clipped to the grid."""
    lo = (torch.ceil(tri.amin(1) - _EPS) - 1).long().clamp(0, r - 1)
    hi = torch.floor(tri.amax(1) + _EPS).long().clamp(-1, r - 1)
    return lo, (hi - lo + 1).clamp(min=0)


def _split_large(tri: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop triangles outside the grid; split those spanning more than ``MAX_SPAN`` voxels 1 -> 4 at edge midpoints
    until none does. Returns the pieces, their first voxel and their span."""
    done = []
    while len(tri):
        lo, span = _bounds(tri, r)
        inside = (span > 0).all(1)
        small = inside & (span <= MAX_SPAN).all(1)
        done.append((tri[small], lo[small], span[small]))
        big = tri[inside & ~small]
        a, b, c = big.unbind(1)
        ab, bc, ca = (a + b) / 2, (b + c) / 2, (c + a) / 2
        tri = torch.cat([torch.stack(t, 1) for t in ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
    return tuple(torch.cat(parts) for parts in zip(*done))


def _box_hits(q: torch.Tensor, a: int, b: int, d: int) -> torch.Tensor:
    """``[M, 4]`` rows ``(i, j, k, triangle)``: voxels of the ``a x b x d`` box grid at the origin that triangles
    ``q [T, 3, 3]`` touch (local voxel units). Triangles run along the last, contiguous axis so that every
    broadcast operation has a long inner loop."""
    q = q.permute(1, 2, 0)                                                   # [3 vertices, 3 coords, T]
    dev, dt = q.device, q.dtype
    centre = [torch.arange(n, device=dev, dtype=dt)[:, None] + 0.5 for n in (a, b, d)]  # [n, 1]
    # slack for rounding in the cross product of slivers (whose normal is then noise): keeps the test conservative
    slack = 1e-12 * max(a, b, d) ** 3
    # plane axis: n . (c - v0) = X[i] + Y[j] + Z[k]
    n = torch.linalg.cross(q[1] - q[0], q[2] - q[0], dim=0)                  # [3, T]
    x, y, z = (n[m] * (centre[m] - q[0, m]) for m in range(3))               # [a, T], [b, T], [d, T]
    dist = x[:, None, None] + y[None, :, None] + z[None, None]
    hit = dist.abs_() <= _HALF * n.abs().sum(0) + slack                      # [a, b, d, T]
    # edge axes, one coordinate plane (u, v) at a time, on the grid of columns of that plane
    e = q[[1, 2, 0]] - q                                                     # [3 edges, 3, T]
    for u, v, shape in ((0, 1, (slice(None), slice(None), None)),
                        (1, 2, (None, slice(None), slice(None))),
                        (0, 2, (slice(None), None, slice(None)))):
        mu, mv = -e[:, v], e[:, u]                                           # [3 edges, T]: 2D edge normals
        proj = mu[:, None] * q[None, :, u] + mv[:, None] * q[None, :, v]     # [edges, vertices, T]
        radius = _HALF * (mu.abs() + mv.abs())
        lo, hi = proj.amin(1) - radius, proj.amax(1) + radius
        ok = None
        for i in range(3):
            p = mu[i] * centre[u][:, None] + mv[i] * centre[v][None]        # [n_u, n_v, T]
            t = (p >= lo[i]) & (p <= hi[i])
            ok = t if ok is None else ok & t
        hit &= ok[shape]
    return hit.nonzero()


def voxel_mesh(coords: torch.Tensor, resolution: int) -> Mesh:
    """The boundary of a set of voxels ``[N, 3]`` at ``resolution`` as a triangle mesh in the cube [-0.5, 0.5]^3:
    two triangles per face between an occupied and an empty voxel, wound counter-clockwise seen from outside."""
    coords = torch.as_tensor(coords).long().reshape(-1, 3)
    occupied = VoxelHash(coords)
    corners, faces = [], []
    for axis in range(3):
        for side in (0, 1):
            step = torch.zeros(3, dtype=torch.long)
            step[axis] = 1 if side else -1
            open_ = coords[occupied.lookup(coords + step) < 0]  # voxels whose neighbour on this side is empty
            u, v = (axis + 1) % 3, (axis + 2) % 3
            quad = torch.zeros(4, 3, dtype=torch.long)
            quad[:, axis] = side
            quad[[1, 2], u] = 1
            quad[[2, 3], v] = 1
            if not side:  # reverse the winding on the low side so every normal points out of the voxel
                quad = quad.flip(0)
            base = sum(len(c) for c in corners)
            corners.append((open_[:, None, :] + quad[None]).reshape(-1, 3))
            idx = base + 4 * torch.arange(len(open_))[:, None]
            faces.append(torch.cat([idx + torch.tensor([0, 1, 2]), idx + torch.tensor([0, 2, 3])]))
    corners = torch.cat(corners) if corners else torch.zeros(0, 3, dtype=torch.long)
    unique, inverse = torch.unique(corners, dim=0, return_inverse=True)
    faces = inverse[torch.cat(faces)] if faces else torch.zeros(0, 3, dtype=torch.long)
    return Mesh(unique.float() / resolution - 0.5, faces)

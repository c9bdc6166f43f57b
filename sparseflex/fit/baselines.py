"""Reference reconstructions that ``sparseflex fit`` is measured against, all on a NORMALISED mesh at resolution R.

- :func:`watertight_udf`: the watertight pipeline most 3D VAEs use: unsigned distance on the grid, iso-surface at
  ``epsilon = 1/R`` by marching cubes -> a closed double-layer shell around the surface (open sheets get two layers
  ``2/R`` apart, interiors survive only as thickened shells);
- :func:`exact_sdf_mc`: marching cubes at level 0 on the exact signed distance (watertight input only), the classical
  upper reference at a given resolution;
- :func:`dense_flexicubes_fit`: FlexiCubes on every voxel of the grid, initialised like the sparse fit but without
  pruning, optimised by the same :class:`~sparseflex.fit.fitter.Fitter`.

Distances are exact (point to triangle) and computed only in a narrow band of grid corners around the surface;
every corner farther away gets a constant larger than any band value (the iso-surfaces at 0 and
``1/R`` only cross cells whose corners all lie in the band). Signs for the exact SDF come from ray parity along grid
columns (scan conversion), exact for any watertight input, nested shells included.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..data.mesh import Mesh
from ..errors import OptionError, check_range
from ..eval.metrics import SurfaceDistance
from ..flexicubes.representation import SparseFlex
from ..sparse.coords import dense_grid
from .convert import mesh_to_sparseflex
from .fitter import FitConfig, FitState, Fitter

#: Band half-width in voxels: every grid corner within 2 voxels of the surface gets its exact distance.
BAND = 2
#: Extra grid corners around the cube, so shells that touch or cross the cube's faces still close.
PAD = BAND + 1
#: Longest edge (voxels) of the triangle pieces whose grown bounding boxes get exact distances.
MAX_PIECE = 8


# -- distance fields on the padded corner grid ------------------------------------------------------------------------

def _grid_size(resolution: int) -> int:
    return resolution + 1 + 2 * PAD


def band_distance(mesh: Mesh, resolution: int, chunk: int = 1 << 20) -> np.ndarray:
    """Unsigned distance ``[n, n, n]`` (float32, ``n = R + 1 + 2 PAD``) on the padded corner grid.

    Grid index ``a`` is corner ``a - PAD``, at ``(a - PAD) / R - 0.5``. Corners within :data:`BAND` voxels of the
    surface hold their exact distance to the triangles; all others ``(BAND + 1) / R``. Computed triangle by triangle
    (long ones cut into pieces with edges of at most :data:`MAX_PIECE` voxels): each piece updates, by a running
    minimum, the corners of its bounding box that lie within the band of its plane and bounding ball, so no corner is
    ever queried against the whole mesh.
    """
    r, n = resolution, _grid_size(resolution)
    tri = (mesh.vertices.detach().cpu().double()[mesh.faces.cpu()] + 0.5) * r + PAD  # grid units
    tri = _split_long(tri, MAX_PIECE)
    surface = SurfaceDistance(tri.reshape(-1, 3), torch.arange(3 * len(tri)).reshape(-1, 3))
    tri = tri[torch.from_numpy(surface.faces)]                                 # its rows: zero-area pieces dropped
    lo = torch.ceil(tri.amin(1) - BAND).long().clamp(0, n - 1)
    size = (torch.floor(tri.amax(1) + BAND).long().clamp(0, n - 1) - lo + 1).amax(1)
    size, order = torch.sort(size)
    centre = tri.mean(1)
    radius = (tri - centre[:, None]).norm(dim=2).amax(1)
    normal = torch.nn.functional.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=1)
    grid = torch.full((n ** 3,), float(BAND + 1))  # voxel units
    for k in torch.unique(size).tolist():
        rows = order[size == k]
        box = torch.stack(torch.meshgrid(*[torch.arange(k)] * 3, indexing="ij"), -1).reshape(-1, 3)
        for s in range(0, len(rows), max(1, chunk // len(box))):
            piece = rows[s:s + max(1, chunk // len(box))]
            corner = (lo[piece, None] + box[None]).clamp_(max=n - 1)
            rel = corner - centre[piece, None]
            near = ((rel.norm(dim=2) <= radius[piece, None] + BAND)                  # the grown ball ...
                    & ((rel * normal[piece, None]).sum(2).abs() <= BAND))          # ... within the slab
            corner, piece = corner[near], piece[:, None].expand(near.shape)[near]
            d2 = surface.squared_distance(corner.double().numpy(), piece.numpy())
            key = (corner[:, 0] * n + corner[:, 1]) * n + corner[:, 2]
            grid.scatter_reduce_(0, key, torch.from_numpy(np.sqrt(d2)).float(), "amin")
    return (grid.reshape(n, n, n) / r).numpy()


def _split_long(tri: torch.Tensor, max_length: float) -> torch.Tensor:
    """Bisect triangles ``[T, 3, 3]`` at the midpoint of their longest edge until no edge is longer than
    ``max_length`` (the pieces cover exactly the triangle; slivers give a number of pieces linear in their length)."""
    done = []
    while len(tri):
        length = (tri[:, [1, 2, 0]] - tri).norm(dim=2)  # edge i runs from vertex i to vertex i + 1
        longest = length.argmax(1)
        long = length.gather(1, longest[:, None])[:, 0] > max_length
        done.append(tri[~long])
        # rotate each long triangle so its longest edge is (a, b), then cut it at that edge's midpoint m
        turn = (longest[long, None] + torch.arange(3)) % 3
        a, b, c = tri[long][torch.arange(len(turn))[:, None], turn].unbind(1)
        m = (a + b) / 2
        tri = torch.cat([torch.stack([a, m, c], 1), torch.stack([m, b, c], 1)])
    return torch.cat(done)


def inside_parity(mesh: Mesh, resolution: int, chunk: int = 1 << 22) -> np.ndarray:
    """Inside-outside ``[n, n, n]`` bool of the padded corner grid by ray parity: a corner is inside when a ray from
    it along -z crosses the surface an odd number of times.

    Each grid column is one ray, shifted by a tiny irrational amount so it never passes exactly through an edge or a
    vertex (only corners within ~1e-5 voxel of the surface could change side, where the distance is ~0 anyway).
    Only meaningful for watertight meshes.
    """
    r, n = resolution, _grid_size(resolution)
    shift = np.array([0.7071067811865e-5, 0.5772156649015e-5])
    tri = (mesh.vertices.detach().cpu().double().numpy()[mesh.faces.cpu().numpy()] + 0.5) * r + PAD  # grid units
    a, b, c = (tri[:, i] for i in range(3))
    area2 = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    keep = area2 != 0  # triangles seen edge-on from the columns are never crossed
    tri, area2 = tri[keep], area2[keep]
    lo = np.ceil(tri[:, :, :2].min(1) - shift).astype(np.int64)
    hi = np.floor(tri[:, :, :2].max(1) - shift).astype(np.int64)
    span = np.maximum(hi - lo + 1, 0)
    count = span[:, 0] * span[:, 1]
    crossings = np.zeros(n * n * (n + 1), dtype=np.uint8)  # per column, hits binned by the first corner above them
    bounds = np.concatenate([[0], np.cumsum(count)])
    start = 0
    while start < len(tri):
        end = int(np.searchsorted(bounds, bounds[start] + chunk, side="right")) - 1
        end = max(end, start + 1)
        t = np.repeat(np.arange(start, end), count[start:end])
        local = np.arange(len(t)) - np.repeat(bounds[start:end] - bounds[start], count[start:end])
        col = lo[t] + np.stack([local // span[t, 1], local % span[t, 1]], 1)
        p = col + shift
        # barycentric coordinates of the column in the triangle's xy projection
        ta, tb, tc = tri[t, 0], tri[t, 1], tri[t, 2]
        wb = ((p[:, 0] - ta[:, 0]) * (tc[:, 1] - ta[:, 1]) - (p[:, 1] - ta[:, 1]) * (tc[:, 0] - ta[:, 0])) / area2[t]
        wc = ((tb[:, 0] - ta[:, 0]) * (p[:, 1] - ta[:, 1]) - (tb[:, 1] - ta[:, 1]) * (p[:, 0] - ta[:, 0])) / area2[t]
        hit = (wb >= 0) & (wc >= 0) & (wb + wc <= 1)
        z = ta[hit, 2] + wb[hit] * (tb[hit, 2] - ta[hit, 2]) + wc[hit] * (tc[hit, 2] - ta[hit, 2])
        above = np.clip(np.floor(z).astype(np.int64) + 1, 0, n)
        ij = col[hit]
        ok = ((ij >= 0) & (ij < n)).all(1)
        np.add.at(crossings, ((ij[ok, 0] * n + ij[ok, 1]) * (n + 1) + above[ok]), 1)
        start = end
    # uint8 sums wrap modulo 256, which keeps the parity
    return (np.cumsum(crossings.reshape(n, n, n + 1), axis=2, dtype=np.uint8)[:, :, :n] & 1).astype(bool)


def is_watertight(mesh: Mesh) -> bool:
    """Every edge shared by exactly two faces once coincident vertices are merged (trimesh's test)."""
    tm = mesh.to_trimesh()
    tm.merge_vertices()
    return bool(tm.is_watertight)


def _marching_cubes(grid: np.ndarray, level: float, resolution: int) -> Mesh:
    """Iso-surface of a padded corner grid, back in the normalised frame, faces wound outward (values < level
    inside)."""
    from skimage.measure import marching_cubes

    if not (grid.min() < level < grid.max()):
        return Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long))
    verts, faces, _, _ = marching_cubes(grid, level, gradient_direction="descent")
    verts = (verts.astype(np.float64) - PAD) / resolution - 0.5
    return Mesh(torch.from_numpy(verts.astype(np.float32)), torch.from_numpy(faces.astype(np.int64)))


# -- the baselines ----------------------------------------------------------------------------------------------------

def watertight_udf(mesh: Mesh, resolution: int) -> Mesh:
    """The watertight VAE pipeline: the ``1/R`` iso-surface of the unsigned distance (a closed double layer)."""
    check_range("resolution", resolution, 2, 2048)
    return _marching_cubes(band_distance(mesh, resolution), 1.0 / resolution, resolution)


def exact_sdf(mesh: Mesh, resolution: int) -> np.ndarray:
    """Signed distance (negative inside) on the padded corner grid, exact within the band; watertight meshes only."""
    if not is_watertight(mesh):
        raise OptionError("exact SDF needs a watertight mesh (every edge shared by two faces); this one is open")
    dist = band_distance(mesh, resolution)
    return np.where(inside_parity(mesh, resolution), -dist, dist)


def exact_sdf_mc(mesh: Mesh, resolution: int) -> Mesh:
    """Marching cubes at level 0 on the exact signed distance at ``resolution`` (watertight input only)."""
    check_range("resolution", resolution, 2, 2048)
    return _marching_cubes(exact_sdf(mesh, resolution), 0.0, resolution)


# -- dense FlexiCubes -------------------------------------------------------------------------------------------------

def densify(sf: SparseFlex) -> SparseFlex:
    """The same field on every voxel of ``[-1, R]^3`` (the grid and the one-voxel border a band may step into).

    Band corners keep their SDF; every other corner takes the majority sign of the band corners bordering its
    connected region (flood fill), ``3`` voxels away from zero: no distance query outside the band.
    """
    from scipy import ndimage

    r = sf.resolution
    lo = min(int(sf.corners[:, 1:].min()), -1)
    n = max(r + 2, int(sf.corners[:, 1:].max()) + 1) - lo
    grid = np.full((n, n, n), np.nan, dtype=np.float32)
    c = (sf.corners[:, 1:] - lo).numpy()
    grid[c[:, 0], c[:, 1], c[:, 2]] = sf.sdf.detach().cpu().numpy()
    unknown = np.isnan(grid)
    labels, count = ndimage.label(unknown)
    border = ndimage.binary_dilation(unknown) & ~unknown
    near_label = ndimage.grey_dilation(labels, size=3) * border
    sums = np.bincount(near_label[border], weights=np.sign(grid[border]), minlength=count + 1)
    sign = np.where(sums >= 0, 1.0, -1.0).astype(np.float32)
    grid[unknown] = sign[labels[unknown]] * 3.0 / r
    coords = dense_grid(n - 1) + torch.tensor([0, lo, lo, lo])
    return SparseFlex.from_sdf(coords, r, lambda pos: torch.from_numpy(grid.reshape(-1)))


def dense_sparseflex(mesh: Mesh, resolution: int, seed: int = 0) -> SparseFlex:
    """Every voxel of the grid active, corner SDF from oriented points in the band, flood-fill signs elsewhere."""
    return densify(mesh_to_sparseflex(mesh, resolution, seed=seed))


def dense_flexicubes_fit(mesh: Mesh, resolution: int, iterations: int, config: FitConfig | None = None,
                         seed: int = 0, progress=None) -> Mesh:
    """Dense FlexiCubes fitted by rendering losses with the same :class:`Fitter`, one stage at ``resolution``."""
    cfg = replace(config or FitConfig(), resolution=resolution, start_resolution=resolution,
                  iterations=iterations, seed=seed)
    sf = Fitter(mesh, cfg, FitState(dense_sparseflex(mesh, resolution, seed))).run(progress)
    ex = sf.extract()
    return Mesh(ex.vertices.detach(), ex.faces)


#: Peak resident memory of a dense fit ~ DENSE_BASE + DENSE_PER_VOXEL * voxels: extraction forward + backward, Adam
#: state, 256^2 renders. `benchmarks/fit.py --calibrate 64,128` (3 steps, kitten) measured 0.77 GB at 64 and 2.74 GB
#: at 128 (1060 bytes per voxel above a 0.47 GB base); a 40-step fit of spot at 64 peaked at 0.84 GB (the peak grows a
#: little over the first steps). Rounded up to an upper estimate.
DENSE_BASE = 0.5e9
DENSE_PER_VOXEL = 1.2e3


def dense_peak_bytes(resolution: int) -> float:
    """Estimated peak memory of :func:`dense_flexicubes_fit` at ``resolution`` (its ``(R + 2)^3`` voxels)."""
    return DENSE_BASE + DENSE_PER_VOXEL * (resolution + 2) ** 3


def largest_dense_resolution(budget_bytes: float, max_resolution: int = 1024) -> int:
    """The largest power of two (>= 8, FitConfig's minimum) whose estimated dense-fit peak fits the budget."""
    if dense_peak_bytes(8) > budget_bytes:
        raise OptionError(f"a dense FlexiCubes fit needs about {dense_peak_bytes(8) / 1e9:.1f} GB even at 8^3; "
                          f"the budget is {budget_bytes / 1e9:.2f} GB")
    r = 8
    while r * 2 <= max_resolution and dense_peak_bytes(r * 2) <= budget_bytes:
        r *= 2
    return r

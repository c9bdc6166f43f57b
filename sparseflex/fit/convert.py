"""Mesh -> SparseFlex without optimisation: voxelise the surface, take the SDF from oriented points, keep the
features thinner than a voxel, close the band, extract.

This is the initialisation of ``sparseflex fit`` and the ``sparseflex convert`` command.

Topology. The extracted surface has a boundary exactly where a crossing edge (corner signs differ) lacks one of its
4 voxels (SPEC section 2, step 5). So every crossing edge gets its 4 voxels (:func:`close_band`), except next to an
open boundary of the input, where the band is cut on purpose. A closed input (see :func:`is_closed`: watertight
meshes, and solids that touch along shared edges) thus gives a closed output by construction; its corner signs come
from ray parity (:class:`ColumnParity`), which changes only at the surface, so the closing adds few voxels and no
surface the input lacks.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..data.mesh import Mesh
from ..data.sampling import sample_surface
from ..data.voxelize import voxelize
from ..eval.topology import undirected_edges, weld
from ..flexicubes.extract import voxel_cases
from ..flexicubes.init_sdf import ColumnParity, OrientedPoints
from ..flexicubes.representation import SparseFlex, deform_for
from ..flexicubes.tables import CROSSING_EDGES, EDGE_AXIS, EDGE_CORNERS
from ..render.visibility import cast_rays, embree_available
from ..sparse.coords import (CORNER_OFFSETS, VoxelHash, batched, coords_to_keys, corner_lattice, dilate,
                             keys_to_coords)
from .stream import oriented_samples


def default_num_points(num_voxels: int) -> int:
    """Enough samples that every surface voxel holds several (the nearest-sample SDF is then sub-voxel accurate)."""
    return int(min(max(16 * num_voxels, 200_000), 24_000_000))


class Cuts:
    """Where the surface of a mesh must end: its open boundary (edges used by one face once coincident vertices are
    welded) and its orientation seams (edges two faces traverse in the same direction: a non-orientable surface such
    as a Moebius strip has one, and no signed field can hold a surface across it). Kept as points spaced at most
    ``spacing`` apart along those edges, for distance queries. A ``closed`` input (:func:`is_closed`) has none: its
    signs come from ray parity, which needs no orientation."""

    def __init__(self, mesh: Mesh, spacing: float, closed: bool = False):
        faces = weld(mesh.vertices, mesh.faces) if not closed else np.zeros((0, 3), dtype=np.int64)
        edges, counts = undirected_edges(faces)
        self.boundary_edges = int((counts == 1).sum())
        seams = _seam_edges(faces, edges, counts)
        self.seam_edges = len(seams)
        v = mesh.vertices.detach().cpu().double().numpy()
        self.boundary = _edge_points(v, edges[counts == 1], spacing)
        self.seam = _edge_points(v, seams, spacing)

    def __bool__(self) -> bool:
        return self.boundary is not None or self.seam is not None

    def ends(self, centres: torch.Tensor, signed: torch.Tensor, lateral: torch.Tensor,
             resolution: int, max_lateral: float = 0.75) -> torch.Tensor:
        """``[M]`` bool: points (with their nearest sample's tangent-plane distance and lateral offset) where the
        surface must not continue: past an open boundary (more than ``max_lateral`` voxels sideways of the nearest
        sample, whose nearest surface point is on the boundary) or over an orientation seam (nearest surface point
        on the seam)."""
        h = 1.0 / resolution
        out = torch.zeros(len(centres), dtype=torch.bool, device=centres.device)
        near = torch.sqrt(signed ** 2 + lateral ** 2).cpu().double().numpy()
        q = centres.detach().cpu().double().numpy()
        if self.boundary is not None:
            past = (lateral > max_lateral * h).cpu().numpy()
            rows = np.nonzero(past)[0]
            d = self.boundary.query(q[rows], k=1, workers=-1)[0]
            out[torch.from_numpy(rows[d <= near[rows] + h]).to(out.device)] = True
        if self.seam is not None:
            d = self.seam.query(q, k=1, workers=-1)[0]
            out |= torch.from_numpy(d <= near + h).to(out.device)
        return out

    def beyond(self, points: torch.Tensor, distance: np.ndarray, resolution: int, slack: float = 0.5,
               seam_slack: float = 2.0) -> np.ndarray:
        """``[M]`` bool: are these points (with their distance to the surface) beyond the open boundary or over a
        seam, i.e. is their nearest surface point on it (within ``slack`` voxels; ``seam_slack`` over a seam, where
        :meth:`ends` cut a slit on both sides)? There the band was cut on purpose and the surface ends."""
        q = points.detach().cpu().double().numpy()
        out = np.zeros(len(q), dtype=bool)
        for tree, extra in ((self.boundary, slack), (self.seam, seam_slack)):
            if tree is not None and len(q):
                out |= tree.query(q, k=1, workers=-1)[0] <= distance + extra / resolution
        return out


def _edge_points(v: np.ndarray, edges: np.ndarray, spacing: float):
    """KD-tree over points spaced at most ``spacing`` along ``edges`` (None without edges)."""
    if not len(edges):
        return None
    a, b = v[edges[:, 0]], v[edges[:, 1]]
    steps = np.maximum(np.ceil(np.linalg.norm(b - a, axis=1) / spacing).astype(np.int64), 1)
    edge = np.repeat(np.arange(len(edges)), steps + 1)
    t = (np.arange(len(edge)) - np.repeat(np.cumsum(steps + 1) - (steps + 1), steps + 1)) / steps[edge]
    return cKDTree(a[edge] + t[:, None] * (b - a)[edge])


def _seam_edges(faces: np.ndarray, edges: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Manifold edges ``[S, 2]`` (of ``edges`` with their face ``counts``) that both their faces traverse in the same
    direction. Edges of more faces are left out: where solids touch along an edge, two traverse it each way."""
    d = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    if not len(d):
        return d.reshape(0, 2)
    uniq, twice = np.unique(d, axis=0, return_counts=True)
    same = np.unique(np.sort(uniq[twice > 1], axis=1), axis=0)
    n = int(faces.max()) + 1
    manifold = edges[counts == 2]
    return same[np.isin(same[:, 0] * n + same[:, 1], manifold[:, 0] * n + manifold[:, 1])]


def is_closed(mesh: Mesh) -> bool:
    """Is every edge (once coincident vertices are welded) used by an even number of faces? Then every ray crosses
    the surface an even number of times and ray parity tells inside from outside: watertight meshes, and also solids
    touching along shared edges (four faces on an edge), which are not edge-manifold."""
    faces = weld(mesh.vertices, mesh.faces)
    return bool(len(faces)) and bool((undirected_edges(faces)[1] % 2 == 0).all())


class CornerField:
    """Corner SDF (and thin-sheet displacement) of a NORMALISED mesh at any resolution, corner by corner.

    Magnitude: the distance to the tangent plane of the nearest oriented sample. Sign: that plane's side, except for
    a closed input (:func:`is_closed`), where ray parity decides (a tangent plane is on the wrong side near sharp
    features and thin parts, which made small spurious surfaces and holes); where the two disagree the magnitude is
    the exact distance to the triangles. Thin sheets (:meth:`OrientedPoints.thin_sheets`) then move the corners next
    to features thinner than a voxel. Every corner's value depends on that corner alone, so a band can be grown
    corner by corner. No value is closer to zero than ``MIN_DISTANCE`` voxels (see the end of :meth:`__call__`).
    """

    MIN_DISTANCE = 1e-3  # voxels

    def __init__(self, mesh: Mesh, samples: OrientedPoints, thin_sheets: bool = True,
                 closed: bool | None = None):
        self.mesh, self.samples, self.thin_sheets = mesh, samples, thin_sheets
        self.closed = is_closed(mesh) if closed is None else closed
        self.side = solid_side_by_rays(mesh) if thin_sheets and embree_available() else None
        self._parity: ColumnParity | None = None
        self._surface = None

    def parity(self, resolution: int) -> ColumnParity:
        """Ray-parity signs at ``resolution`` (kept for the latest resolution only)."""
        if self._parity is None or self._parity.resolution != resolution:
            self._parity = ColumnParity(self.mesh.vertices, self.mesh.faces, resolution)
        return self._parity

    def __call__(self, corners: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """SDF ``[M]`` and world displacement ``[M, 3]`` of integer grid corners ``[M, 3]`` at ``resolution``."""
        pos = corners.to(torch.float32) / resolution - 0.5
        if self.closed or not len(pos):
            sdf = self.samples.sdf(pos).to(pos.dtype)
        else:  # one search for the nearest sample and the side check of the 16 nearest
            sdf, doubt = self.samples.sdf_and_doubt(pos)
            sdf = sdf.to(pos.dtype)
        if self.closed and len(pos):
            inside = self.parity(resolution).inside(corners).to(sdf.device)
            wrong = (sdf < 0) != inside
            if bool(wrong.any()):
                sdf[wrong] = torch.from_numpy(self.distance(pos[wrong])).to(sdf)
            magnitude = sdf.abs().clamp_min(self.MIN_DISTANCE / resolution)  # a zero would read as outside
            sdf = torch.where(inside, -magnitude, magnitude)
        elif len(pos):
            doubt = doubt.to(sdf.device)
            if bool(doubt.any()):
                rows = doubt.nonzero().squeeze(1)
                exact, facing = self.signed_distance(pos[rows])
                rows = rows[torch.from_numpy(facing).to(rows.device)]
                sdf[rows] = torch.from_numpy(exact[facing]).to(sdf)
        disp = torch.zeros_like(pos)
        if self.thin_sheets and len(pos):
            idx, value, move = self.samples.thin_sheets(pos.to(self.samples.points.dtype), resolution, self.side)
            sdf[idx] = value.to(sdf)
            disp[idx] = move.to(disp)
        # No corner exactly on the surface (an axis-aligned face on a grid plane): a zero puts the crossing points of
        # all its edges, and so the dual vertices of the voxels around it, at the corner itself, and once a fit
        # moves its neighbours those coincide (a pinched, non-manifold vertex after welding).
        eps = self.MIN_DISTANCE / resolution
        return torch.where(sdf < 0, sdf.clamp(max=-eps), sdf.clamp(min=eps)), disp

    def distance(self, pos: torch.Tensor) -> np.ndarray:
        """Exact distance of points ``[M, 3]`` to the mesh's triangles."""
        return self._closest(pos)[0]

    def signed_distance(self, pos: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Exact distance of points ``[M, 3]`` to the triangles, signed by the side of the closest triangle's plane
        (the exact counterpart of the nearest sample's tangent plane: no sample to take from the wrong sheet), and
        whether that side means anything: the closest point is inside the triangle, not on an edge or a corner
        (sideways of a fold or a boundary, where no plane says which side a point is on)."""
        q = pos.detach().cpu().double().numpy()
        dist, face = self._closest(pos)
        v = self.mesh.vertices.detach().cpu().double().numpy()
        f = self.mesh.faces.cpu().numpy()[face]
        normal = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        plane = ((q - v[f[:, 0]]) * normal).sum(1)
        return np.where(plane < 0, -dist, dist), np.abs(plane) >= 0.999 * dist

    def _closest(self, pos: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from ..eval.metrics import SurfaceDistance

        if self._surface is None:
            self._surface = SurfaceDistance(self.mesh.vertices, self.mesh.faces)
        return self._surface.query(pos.detach().cpu().double().numpy())


def surface_band(mesh: Mesh, resolution: int, samples: OrientedPoints, dilation: int = 1,
                 max_lateral: float = 0.75, cuts: Cuts | None = None) -> torch.Tensor:
    """The voxels ``[N, 4]`` around a NORMALISED mesh's surface at ``resolution``.

    The voxels the triangles touch, dilated; dilation may step one voxel outside [0, R), because a normalised mesh
    touches the cube's faces and the crossing edges on them would otherwise lack voxels (holes at the extremities).
    Where the input's surface ends (:meth:`Cuts.ends`: past an open boundary, over an orientation seam) voxels are
    dropped, so the surface ends there instead of continuing its tangent plane. Sideways of a sharp feature
    (whose nearest sample is just as far sideways) nothing is dropped: that cut the holes a closed CAD part had.
    """
    points = samples.points
    coords = batched(voxelize(mesh, resolution).to(points.device))
    if dilation > 0:
        coords = dilate(coords, dilation)
        coords = coords[((coords[:, 1:] >= -1) & (coords[:, 1:] <= resolution)).all(1)]
    cuts = cuts if cuts is not None else Cuts(mesh, 0.25 / resolution)
    if not cuts:
        return coords
    centres = (coords[:, 1:].to(points.dtype) + 0.5) / resolution - 0.5
    signed, lateral = samples.nearest(centres)
    return coords[~cuts.ends(centres, signed, lateral, resolution, max_lateral)]


#: Crossing edges :func:`close_band` checks at once.
_CLOSE_CHUNK = 1 << 21


def close_band(coords: torch.Tensor, resolution: int, field, known: tuple | None = None,
               accept=None, max_rounds: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, dict]:
    """Grow a voxel set until every crossing edge (corner signs differ) has its 4 voxels, so the extracted surface
    has no boundary but where ``accept`` refuses to close one.

    ``field(corners [M, 3], resolution) -> (sdf [M], displacement [M, 3])`` gives the values of corners not yet
    known; ``known = (corner keys, sdf, displacement)`` are values already set (a refined fit). ``accept(points
    [K, 3]) -> bool [K]`` decides, from its crossing point, whether a crossing edge lacking voxels gets them (default:
    all do); voxels beyond ``[-1, R]`` are never added. Each round only looks at the voxels the previous one added:
    a crossing edge lacking a voxel is an edge of one of them.

    Returns (voxels ``[N', 4]``, corner keys, corner SDF, corner displacement (sorted by key, covering every corner
    of the voxels), info ``{"added": voxels added, "rounds": ..., "refused": crossing edges left open}``).
    """
    coords = batched(coords)
    device = coords.device
    if known is None:
        keys = torch.zeros(0, dtype=torch.long, device=device)
        sdf, disp = torch.zeros(0, device=device), torch.zeros(0, 3, device=device)
    else:
        keys, sdf, disp = known
        order = torch.argsort(keys)
        keys, sdf, disp = keys[order], sdf[order], disp[order]
    edge_low = _edge_low_corner().to(device)
    around = _edge_neighbours().to(device)  # [12, 4, 3]: the 4 voxels around each voxel edge, from the low corner
    unit = torch.eye(3, dtype=torch.long, device=device)
    frontier, added, rounds, refused = coords, 0, 0, 0
    table = VoxelHash(coords)
    while len(frontier) and rounds < max_rounds:
        rounds += 1
        corners, voxel_corners = corner_lattice(frontier)
        keys, sdf, disp, rows = _merge_values(keys, sdf, disp, coords_to_keys(corners), corners, resolution, field)
        cases = voxel_cases(sdf[rows], voxel_corners)
        del voxel_corners, rows
        v_all, e_all = CROSSING_EDGES.to(device)[cases].nonzero(as_tuple=True)
        del cases
        lacks_any, missing = False, []
        # chunk by chunk of crossing edges: the 4 voxels around each ([K, 4, 4] int64) and their lookups, all at
        # once, were most of convert's peak at 1024^3
        for start in range(0, len(v_all), _CLOSE_CHUNK):
            v, e = v_all[start:start + _CLOSE_CHUNK], e_all[start:start + _CLOSE_CHUNK]
            low = frontier[v, 1:] + CORNER_OFFSETS.to(device)[edge_low[e]]
            cand = torch.cat([frontier[v, :1, None].expand(-1, 4, 1), low[:, None, :] - around[e]], 2)  # [K, 4, 4]
            lacking = (table.lookup(cand) < 0).any(1)
            if not bool(lacking.any()):
                continue
            lacks_any = True
            cand, low, v, e = cand[lacking], low[lacking], v[lacking], e[lacking]
            if accept is not None:
                batch = frontier[v, :1]
                ok = accept(_crossing_points(torch.cat([batch, low], 1), torch.cat(
                    [batch, low + unit[EDGE_AXIS.to(device)[e]]], 1), keys, sdf, disp, resolution))
                refused += int((~ok).sum())
                cand = cand[ok]
            cand = cand.reshape(-1, 4)
            missing.append(torch.unique(coords_to_keys(cand[table.lookup(cand) < 0])))
        del v_all, e_all
        if not lacks_any:
            break
        missing = keys_to_coords(torch.unique(torch.cat(missing)))
        frontier = missing[((missing[:, 1:] >= -1) & (missing[:, 1:] <= resolution)).all(1)]
        if not len(frontier):
            break
        added += len(frontier)
        coords = torch.cat([coords, frontier])
        table = VoxelHash(coords)
    if len(frontier) and rounds >= max_rounds:  # never seen: parity signs change only at the surface
        corners, _ = corner_lattice(frontier)
        keys, sdf, disp, _ = _merge_values(keys, sdf, disp, coords_to_keys(corners), corners, resolution, field)
    return coords, keys, sdf, disp, {"added": added, "rounds": rounds, "refused": refused}


def _crossing_points(c0: torch.Tensor, c1: torch.Tensor, keys, sdf, disp, resolution: int) -> torch.Tensor:
    """Where the linear SDF crosses zero between corners ``c0`` and ``c1`` (``[K, 4]``, values in the sorted store)."""
    i0 = torch.searchsorted(keys, coords_to_keys(c0))
    i1 = torch.searchsorted(keys, coords_to_keys(c1))
    x0 = c0[:, 1:].to(sdf.dtype) / resolution - 0.5 + disp[i0]
    x1 = c1[:, 1:].to(sdf.dtype) / resolution - 0.5 + disp[i1]
    s0, s1 = sdf[i0][:, None], sdf[i1][:, None]
    return (x0 * s1 - x1 * s0) / (s1 - s0)


def _merge_values(keys, sdf, disp, ckeys, corners, resolution, field):
    """Add the values of the corners ``ckeys`` not in ``keys`` (evaluated by ``field``); return the sorted store and
    the rows of ``ckeys`` in it."""
    pos = torch.searchsorted(keys, ckeys).clamp_(max=max(len(keys) - 1, 0))
    new = (keys[pos] != ckeys) if len(keys) else torch.ones_like(ckeys, dtype=torch.bool)
    if bool(new.any()):
        s, d = field(corners[new, 1:], resolution)
        keys = torch.cat([keys, ckeys[new]])
        sdf = torch.cat([sdf.to(s.dtype), s])
        disp = torch.cat([disp.to(d.dtype), d])
        order = torch.argsort(keys)
        keys, sdf, disp = keys[order], sdf[order], disp[order]
    return keys, sdf, disp, torch.searchsorted(keys, ckeys)


def _edge_low_corner() -> torch.Tensor:
    """For each of the 12 voxel edges, its corner with the lower coordinate along the edge's axis."""
    low = []
    for e, (c0, c1) in enumerate(EDGE_CORNERS.tolist()):
        a = int(EDGE_AXIS[e])
        low.append(c0 if int(CORNER_OFFSETS[c0, a]) < int(CORNER_OFFSETS[c1, a]) else c1)
    return torch.tensor(low)


def _edge_neighbours() -> torch.Tensor:
    """``[12, 4, 3]``: the 4 voxels around a grid edge are its low corner minus these offsets (0 along its axis)."""
    out = []
    for e in range(12):
        a = int(EDGE_AXIS[e])
        b, c = (a + 1) % 3, (a + 2) % 3
        offs = []
        for i in (0, 1):
            for j in (0, 1):
                o = [0, 0, 0]
                o[b], o[c] = i, j
                offs.append(o)
        out.append(offs)
    return torch.tensor(out)


def rim_edges(voxel_corners: torch.Tensor, num_corners: int) -> torch.Tensor:
    """Corner rows ``[E, 2]`` (low corner first) of the edges of active voxels that lack one of their 4 voxels: the
    only edges where the extracted surface can have a boundary (when their signs differ).

    An edge is named by its low corner and its axis, so one ``bincount`` per axis counts its voxels: ``[N, 4]`` rows
    and two ``[Nc]`` arrays at a time, no sort (this runs on the 10M voxels of a 1024 fit)."""
    device = voxel_corners.device
    out = []
    for axis in range(3):
        edges = [tuple(EDGE_CORNERS[e].tolist()) for e in range(12) if int(EDGE_AXIS[e]) == axis]
        low = [a if int(CORNER_OFFSETS[a, axis]) == 0 else b for a, b in edges]
        high = [b if int(CORNER_OFFSETS[a, axis]) == 0 else a for a, b in edges]
        lows = voxel_corners[:, low]
        count = torch.bincount(lows.reshape(-1), minlength=num_corners)
        rim = ((count > 0) & (count < 4)).nonzero().squeeze(1)
        other = torch.empty(num_corners, dtype=torch.long, device=device)
        other[lows.reshape(-1)] = voxel_corners[:, high].reshape(-1)
        del lows, count
        out.append(torch.stack([rim, other[rim]], 1))
    return torch.cat(out)


def settle_rim(sdf: torch.Tensor, rim: torch.Tensor, max_fraction: float = 0.25) -> tuple[torch.Tensor, int]:
    """Give the corners joined by the edges ``rim [E, 2]`` one sign per connected piece, the majority's, so none of
    those edges crosses the surface. Pieces whose minority is more than ``max_fraction`` of their corners are left
    alone (a large mixed piece means the surface really crosses there; flipping it would add a surface).

    Used on the rim edges (:func:`rim_edges`) that are not where the input's surface ends: there a crossing opens
    the surface, and a tangent-plane field (inputs without parity signs) also changes sign away from the surface,
    between stacked sheets and at folds, which left small open fragments at the band's edge. Returns the new SDF
    and the number of corners flipped."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(rim):
        return sdf, 0
    nodes, local = torch.unique(rim.reshape(-1), return_inverse=True)
    local = local.reshape(-1, 2).cpu().numpy()
    n = len(nodes)
    _, label = connected_components(coo_matrix((np.ones(len(local)), (local[:, 0], local[:, 1])), shape=(n, n)),
                                    directed=False)
    label = torch.from_numpy(label).to(sdf.device)
    inside = sdf.detach()[nodes] < 0
    pieces = int(label.max()) + 1
    ins = torch.zeros(pieces, device=sdf.device).index_add_(0, label, inside.float())
    size = torch.bincount(label, minlength=pieces).float()
    minority = torch.minimum(ins, size - ins)
    want = (ins > size - ins)[label]
    flip = (want != inside) & (minority <= max_fraction * size)[label]
    if not bool(flip.any()):
        return sdf, 0
    sdf = sdf.detach().clone()
    mag = sdf[nodes[flip]].abs().clamp_min(1e-6)
    sdf[nodes[flip]] = torch.where(want[flip], -mag, mag)
    return sdf, int(flip.sum())


def bubbles(sf: SparseFlex, max_corners: int = 8) -> torch.Tensor:
    """Rows of the corners that make closed bubbles: connected sets (grid neighbours, one sign) of at most
    ``max_corners`` corners whose other grid neighbours are all corners of ``sf`` and all on the other side. Each
    set is wrapped in a closed surface about a voxel across, of its own.

    Candidates first (at least 2 neighbours on the other side: a corner next to an ordinary sheet has 1), so the
    graph is built on a few corners, not on the 12M of a 1024^3 band."""
    device = sf.sdf.device
    table = VoxelHash(sf.corners)
    inside = sf.sdf.detach() < 0
    steps = [(axis, step) for axis in range(3) for step in (-1, 1)]

    def neighbour(rows, axis, step):
        nb = sf.corners[rows].clone()
        nb[:, 1 + axis] += step
        return table.lookup(nb)

    opposite = torch.zeros(len(sf.corners), dtype=torch.uint8, device=device)
    every = torch.arange(len(sf.corners), device=device)
    for axis, step in steps:
        j = neighbour(every, axis, step)
        opposite += ((j >= 0) & (inside[j.clamp_min(0)] != inside)).to(torch.uint8)
        del j
    del every
    cand = (opposite >= 2).nonzero().squeeze(1)
    del opposite
    if not len(cand):
        return cand
    nb = torch.stack([neighbour(cand, axis, step) for axis, step in steps], 1)  # [C, 6]
    local = torch.full((len(sf.corners),), -1, dtype=torch.long, device=device)
    local[cand] = torch.arange(len(cand), device=device)
    same = (nb >= 0) & (inside[nb.clamp_min(0)] == inside[cand][:, None])
    ln = local[nb.clamp_min(0)]
    joined = same & (ln >= 0)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    r, c = joined.nonzero(as_tuple=True)
    _, label = connected_components(coo_matrix((np.ones(len(r)), (r.cpu().numpy(), ln[r, c].cpu().numpy())),
                                               shape=(len(cand), len(cand))), directed=False)
    label = torch.from_numpy(label).to(device)
    pieces = int(label.max()) + 1
    # a set is closed off when every neighbour exists and is either on the other side or in the set
    bad = (nb < 0) | (same & ~joined)
    open_ = torch.zeros(pieces, dtype=torch.bool, device=device)
    open_[label[bad.any(1)]] = True
    size = torch.bincount(label, minlength=pieces)
    return cand[~open_[label] & (size[label] <= max_corners)]


def _crossing_edges(sf: SparseFlex) -> tuple[torch.Tensor, torch.Tensor]:
    """(voxel rows, edge numbers 0..11) of the voxel edges whose corner signs differ, edge number by edge number
    (a ``[N, 12]`` gather of int64 rows is 1 GB at 1024^3)."""
    inside = sf.sdf.detach() < 0
    vc = sf.voxel_corners
    v, e = [], []
    for k, (a, b) in enumerate(EDGE_CORNERS.tolist()):
        rows = (inside[vc[:, a]] != inside[vc[:, b]]).nonzero().squeeze(1)
        v.append(rows)
        e.append(torch.full_like(rows, k))
    return torch.cat(v), torch.cat(e)


def jump_voxels(sf: SparseFlex, field: CornerField, resolution: int, slack: float = 0.25) -> torch.Tensor:
    """``[N]`` bool: the voxels whose every crossing edge is a jump of the sign field, not the input's surface.

    The surface can cross an edge only if the edge's ends lie within its length of the surface together:
    ``d(a) + d(b) <= |a - b|`` for the exact distances ``d`` (``slack`` voxels of tolerance). A tangent-plane
    field (inputs without parity signs) also changes sign where the nearest sample jumps from one sheet to another
    (between sheets whose orientations disagree, sideways of a boundary), and where such a crossing lies inside
    the band it makes surface the input lacks: a hole when its edge lacks voxels (the band's rim), a bridge or a
    fragment when it has them. Dropping the voxels that hold nothing else removes that surface and no other: a
    voxel with one real crossing edge is kept, with every voxel around that edge."""
    n = len(sf.coords)
    drop = torch.zeros(n, dtype=torch.bool, device=sf.sdf.device)
    v, e = _crossing_edges(sf)
    if not len(v):
        return drop
    ends = EDGE_CORNERS.to(v.device)
    ra, rb = sf.voxel_corners[v, ends[e, 0]], sf.voxel_corners[v, ends[e, 1]]
    pos = sf.corner_positions().detach()
    rows, inv = torch.unique(torch.cat([ra, rb]), return_inverse=True)
    ia, ib = inv[:len(v)], inv[len(v):]
    limit = (pos[ra] - pos[rb]).norm(dim=1) + slack / resolution
    del ra, rb
    # the nearest sample lies on the surface, so its distance bounds d from above; exact distances for the rest
    signed, lateral = field.samples.nearest(pos[rows])
    d = torch.sqrt(signed ** 2 + lateral ** 2).to(pos.dtype)
    doubt = d[ia] + d[ib] > limit
    if not bool(doubt.any()):
        return drop
    check = torch.unique(torch.cat([ia[doubt], ib[doubt]]))
    d[check] = torch.as_tensor(field.distance(pos[rows[check]]), dtype=d.dtype, device=d.device)
    jump = doubt & (d[ia] + d[ib] > limit)
    drop[v[jump]] = True
    drop[v[~jump]] = False
    return drop


def stray_pieces(sf: SparseFlex, field: CornerField, resolution: int, near: float = 1.0) -> torch.Tensor:
    """``[N]`` bool: the voxels of the pieces of surface that come nowhere near the input's surface.

    A piece is a connected set of crossing edges that have their 4 voxels (each gives a quad of the extracted
    surface), joined through shared voxels. A tangent-plane field (inputs without parity signs) also changes sign
    where the nearest sample jumps from one sheet to another, away from the surface: past an open boundary, between
    sheets close together. Where such a crossing has its 4 voxels (the band's dilation) it makes a small fragment of
    surface of its own, bounded by rim edges that :func:`settle_rim` leaves (they lie past the boundary, where the
    surface ends on purpose): an extra boundary loop, an extra component. A piece none of whose crossing points lies
    within ``near`` voxels of the input's surface is such a fragment. Dropping its voxels removes its quads only:
    any quad that uses one of them belongs to the same piece."""
    n = len(sf.coords)
    device = sf.sdf.device
    if not n:
        return torch.zeros(0, dtype=torch.bool, device=device)
    ends = EDGE_CORNERS.to(device)
    vc = sf.voxel_corners
    v, e = _crossing_edges(sf)
    if not len(v):
        return torch.zeros(n, dtype=torch.bool, device=device)
    low = vc[v, _edge_low_corner().to(device)[e]]
    key = low * 3 + EDGE_AXIS.to(device)[e]  # an edge: its low corner and its axis
    uniq, edge, count = torch.unique(key, return_inverse=True, return_counts=True)
    complete = count[edge] == 4
    v, e, edge = v[complete], e[complete], edge[complete]
    if not len(v):
        return torch.zeros(n, dtype=torch.bool, device=device)
    _, edge = torch.unique(edge, return_inverse=True)
    m = int(edge.max()) + 1
    # the crossing point of each quad (one voxel's view of it is enough)
    first = torch.full((m,), len(v), dtype=torch.long, device=device).scatter_reduce_(
        0, edge, torch.arange(len(v), device=device), reduce="amin")
    pos = sf.corner_positions().detach()
    r0, r1 = vc[v[first], ends[e[first], 0]], vc[v[first], ends[e[first], 1]]
    s0, s1 = sf.sdf.detach()[r0][:, None], sf.sdf.detach()[r1][:, None]
    points = (pos[r0] * s1 - pos[r1] * s0) / (s1 - s0)
    del pos, first, r0, r1, s0, s1
    # the nearest sample bounds the distance from above (it lies on the surface); the exact distance for the rest
    signed, lateral = field.samples.nearest(points)
    close = torch.sqrt(signed ** 2 + lateral ** 2) <= near / resolution
    doubt = (~close).nonzero().squeeze(1)
    if len(doubt):
        close[doubt] = torch.as_tensor(field.distance(points[doubt]) <= near / resolution, device=device)
    if bool(close.all()):  # the usual case: no piece to look at
        return torch.zeros(n, dtype=torch.bool, device=device)
    # A piece is stray when none of its quads is close. Its far quads joined through shared voxels form one
    # component of the far quads' graph that shares no voxel with a close quad; so only far quads need the graph.
    far = ~close[edge]
    near_voxel = torch.zeros(n, dtype=torch.bool, device=device)
    near_voxel[v[~far]] = True
    vf, ef = v[far], edge[far]
    voxels, vn = torch.unique(vf, return_inverse=True)
    quads, en = torch.unique(ef, return_inverse=True)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    k = len(voxels) + len(quads)
    vn, en = vn.cpu().numpy(), en.cpu().numpy() + len(voxels)
    _, label = connected_components(coo_matrix((np.ones(len(vn)), (vn, en)), shape=(k, k)), directed=False)
    label = torch.from_numpy(label[:len(voxels)]).to(device)
    touches = torch.zeros(int(label.max()) + 1, dtype=torch.bool, device=device)
    touches[label[near_voxel[voxels]]] = True
    stray = torch.zeros(n, dtype=torch.bool, device=device)
    stray[voxels[~touches[label]]] = True
    return stray


def sparseflex_from_values(coords: torch.Tensor, resolution: int, keys: torch.Tensor, sdf: torch.Tensor,
                           disp: torch.Tensor) -> SparseFlex:
    """A SparseFlex on ``coords`` whose corners take their values from a sorted store (neutral weights)."""
    coords = batched(coords)
    corners, voxel_corners = corner_lattice(coords)
    rows = torch.searchsorted(keys, coords_to_keys(corners))
    n, zeros = len(coords), sdf.new_zeros
    return SparseFlex(coords, resolution, corners, voxel_corners, sdf[rows].clone(),
                      deform_for(disp[rows], resolution), zeros(n, 8), zeros(n, 12), zeros(n))


def surface_crossings(field: CornerField, cuts: Cuts, resolution: int, near: float = 0.5):
    """``accept`` for :func:`close_band` on an input that is not closed: a crossing edge gets its voxels when
    its crossing point lies within ``near`` voxels of the input's surface and not beyond its open boundary. Without
    parity signs a tangent-plane field also crosses zero away from the surface (past an open boundary, where the
    surface must end; between stacked sheets facing the same way); closing there would follow that crossing outwards."""

    def accept(points: torch.Tensor) -> torch.Tensor:
        dist = field.distance(points.detach().cpu())
        ok = dist <= near / resolution
        if cuts:
            ok &= ~cuts.beyond(points, dist, resolution)
        return torch.from_numpy(ok).to(points.device)

    return accept


def close_and_settle(coords: torch.Tensor, resolution: int, field: CornerField, cuts: Cuts,
                     known: tuple | None = None, info: dict | None = None) -> SparseFlex:
    """The SparseFlex on ``coords`` (plus what :func:`close_band` adds), its rim settled (:func:`settle_rim`) except
    where the input's surface ends: closed by construction for a closed input, open only along the input's own
    boundaries (and seams) otherwise."""
    accept = None if field.closed else surface_crossings(field, cuts, resolution)
    coords, keys, sdf, disp, done = close_band(coords, resolution, field, known=known, accept=accept)
    sf = sparseflex_from_values(coords, resolution, keys, sdf, disp)
    if not field.closed and known is None:  # a fit's values (``known``) need not be distances: leave them
        jumps = jump_voxels(sf, field, resolution)
        done["jump_voxels"] = int(jumps.sum())
        if bool(jumps.any()):
            sf.keep_(~jumps)
    rim = rim_edges(sf.voxel_corners, len(sf.corners))
    inside = sf.sdf < 0
    crossing = inside[rim[:, 0]] != inside[rim[:, 1]]
    if cuts and bool(crossing.any()):  # where the surface ends on purpose, its crossings stay
        rows = crossing.nonzero().squeeze(1)
        pts = _crossing_points(sf.corners[rim[rows, 0]], sf.corners[rim[rows, 1]], *_store(sf), resolution)
        ends_here = torch.from_numpy(cuts.beyond(pts, field.distance(pts), resolution)).to(rows.device)
        keep = torch.ones(len(rim), dtype=torch.bool, device=rim.device)
        keep[rows[ends_here]] = False
        rim = rim[keep]
    sf.sdf, done["rim_flips"] = settle_rim(sf.sdf, rim)
    if not field.closed:  # tangent-plane signs leave lone corners at folds; parity's are the input's own
        lone = bubbles(sf)
        sf.sdf[lone] = -sf.sdf[lone]
        done["bubble_corners"] = len(lone)
        stray = stray_pieces(sf, field, resolution)
        done["stray_voxels"] = int(stray.sum())
        if bool(stray.any()):
            sf.keep_(~stray)
    if info is not None:
        info.update(done, closed_input=field.closed, boundary_edges_input=cuts.boundary_edges,
                    seam_edges_input=cuts.seam_edges)
    return sf


def _store(sf: SparseFlex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, sdf, displacement) of the corners of ``sf`` (sorted by key, as corner_lattice makes them)."""
    return coords_to_keys(sf.corners), sf.sdf.detach(), sf.displacement().detach()


def mesh_to_sparseflex(mesh: Mesh, resolution: int, dilation: int = 1, num_points: int | None = None,
                       seed: int = 0, max_lateral: float = 0.75,
                       samples: OrientedPoints | None = None,
                       thin_sheets: bool = True, field: CornerField | None = None,
                       info: dict | None = None) -> SparseFlex:
    """SparseFlex of a NORMALISED mesh: the :func:`surface_band` voxels, corner values from :class:`CornerField`,
    closed by :func:`close_band` (open only next to the input's own open boundaries).

    ``samples`` reuses a surface sample already drawn (with its KD-trees); otherwise ``num_points`` are drawn (by
    default enough for the resolution). ``thin_sheets`` keeps plates and gaps thinner than a voxel by moving the
    corners next to them onto their mid-sheet (:meth:`OrientedPoints.thin_sheets`); where two sheets coincide
    (touching parts, double-sided cloth) rays through the mesh decide which side is solid (needs Embree).
    ``field`` reuses a :class:`CornerField`; ``info`` (a dict) receives what the closing did."""
    oriented = samples if samples is not None else (field.samples if field is not None else None)
    if oriented is None:
        if num_points is None:  # size the sample to the voxel count, estimated from the surface area
            num_points = default_num_points(int(2 * mesh.area * resolution ** 2 * (1 + 2 * dilation)))
        gen = torch.Generator().manual_seed(seed)
        oriented = oriented_samples(*sample_surface(mesh, num_points, generator=gen)[:2])  # tiled when large
    field = field if field is not None else CornerField(mesh, oriented, thin_sheets)
    cuts = Cuts(mesh, 0.25 / resolution, closed=field.closed)
    coords = surface_band(mesh, resolution, oriented, dilation, max_lateral, cuts)
    return close_and_settle(coords, resolution, field, cuts, info=info)


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

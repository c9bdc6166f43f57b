"""Corner SDF from oriented surface points: the signed distance to the tangent plane of the nearest sample.

Unlike inside/outside tests (winding numbers, flood fill), this needs no watertight input: it works for closed, open
and nested surfaces alike, because only the local side of the nearest surface matters. Features thinner than the grid
get their corners moved onto them (:meth:`OrientedPoints.thin_sheets`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree


class OrientedPoints:
    """Surface samples ``[M, 3]`` with unit normals and one KD-tree over them (built once, on the CPU with scipy):
    the source of every corner SDF taken from a mesh. Results return to the query's device."""

    def __init__(self, points: torch.Tensor, normals: torch.Tensor):
        self.points, self.normals = points, normals
        self._P = points.detach().cpu().double().numpy()
        self._N = normals.detach().cpu().double().numpy()
        self.tree = cKDTree(self._P)
        self._bins = None  # per-direction trees, built on first use by thin_sheets

    def nearest(self, query: torch.Tensor, chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
        """For each query ``q`` and its nearest sample ``(p, n)``: the signed tangent-plane distance
        ``dot(q - p, n)`` and the lateral distance (how far ``q`` lies sideways of ``p`` along the tangent plane,
        large past the boundary of an open surface)."""
        q = query.detach().cpu().double().numpy()
        idx = np.empty(len(q), dtype=np.int64)
        for start in range(0, len(q), chunk):
            idx[start:start + chunk] = self.tree.query(q[start:start + chunk], k=1, workers=-1)[1]
        return tangent_distances(self.points, self.normals, idx, query)

    def sdf_and_doubt(self, query: torch.Tensor, k: int = 16,
                      chunk: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sdf`, and ``[M]`` bool: do the tangent planes of the ``k`` samples nearest to each query disagree
        on its side? (One tree search for both.)

        Then the nearest sample's sign is a toss-up: two sheets closer together than the sample spacing (a fold,
        a doubled hem) put samples of both within reach, and a query a few voxels away takes the far sheet's
        plane, with the far sheet's sign, as often as the near one's. With ``k = 16`` all of them are on one sheet
        once in 2^15 such queries."""
        q = query.detach().cpu().double().numpy()
        nearest = np.empty(len(q), dtype=np.int64)
        doubt = np.zeros(len(q), dtype=bool)
        k = min(k, len(self._P))
        for start in range(0, len(q), chunk):
            qq = q[start:start + chunk]
            idx = self.tree.query(qq, k=k, workers=-1)[1].reshape(len(qq), -1)
            side = ((qq[:, None] - self._P[idx]) * self._N[idx]).sum(2) > 0
            nearest[start:start + chunk] = idx[:, 0]
            doubt[start:start + chunk] = side.any(1) & ~side.all(1)
        sdf = tangent_distances(self.points, self.normals, nearest, query)[0]
        return sdf, torch.from_numpy(doubt).to(query.device)

    def sdf(self, query: torch.Tensor) -> torch.Tensor:
        """``dot(q - p, n)`` with ``(p, n)`` the sample nearest to each query ``q``."""
        return self.nearest(query)[0]

    def thin_sheets(self, corners: torch.Tensor, resolution: int, solid_side=None, max_lateral: float = 0.75,
                    coincident: float = 0.02, chunk: int = 1 << 19) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Corner SDF and displacement that keep features thinner than the grid: a solid plate or an air gap bounded by
        two opposite-facing sheets closer than the corner spacing along their normal.

        A grid samples such a feature with no corner inside it, so the SDF never changes sign there and the
        feature vanishes (thin walls, the clearance between the parts of an assembly). The corners within
        ``|n|_1 / 2`` voxels of the mid-sheet (``n`` its unit normal: the thinnest layer of corners that is
        face-connected, so the extracted sheet has no holes) move onto it, each axis by at most half a voxel (the
        deformation's range), and take the mid-sheet's signed distance: ``-t/2`` inside a plate of thickness ``t``,
        ``+g/2`` in a gap ``g``. Linear interpolation to the neighbouring corners, whose tangent-plane distances
        stay, puts both sheets back.

        Sheets that coincide (``|t| < coincident`` voxels: parts touching face to face, double-sided cloth) do not
        say locally which side is solid. ``solid_side(points [M, 3], normals [M, 3]) -> bool [M]`` (numpy) decides
        it when given: every nearby corner takes that sign, and the corner layer on the sheets a sliver of the
        other one (air between touching solids, a solid sheet between air), so both coincident faces survive.
        Without it they are left to the nearest-sample SDF.

        Returns (corner index ``[M]``, SDF ``[M]``, world displacement ``[M, 3]``) of the ``corners [Nc, 3]`` (world
        positions of a grid at ``resolution``) to change.
        """
        h = 1.0 / resolution
        P, N = self._P, self._N
        Q = corners.detach().cpu().double().numpy()
        out_idx, out_sdf, out_disp = [], [], []
        for start in range(0, len(Q), chunk):
            q = Q[start:start + chunk]
            dist, i1 = self.tree.query(q, k=1, distance_upper_bound=2 * h, workers=-1)
            found = np.isfinite(dist)
            i1 = np.where(found, i1, 0)
            i2 = self._nearest_opposite(q, i1, found, 2 * h)
            cand = np.nonzero(i2 >= 0)[0]                           # corners with two opposite-facing sheets nearby
            q, i1, i2 = q[cand], i1[cand], i2[cand]
            p1, n1, p2, n2 = P[i1], N[i1], P[i2], N[i2]
            s = ((p2 - p1) * n1).sum(1)                             # > 0: gap (normals face each other), < 0: plate
            mid_n = n1 - n2
            mid_n /= np.linalg.norm(mid_n, axis=1, keepdims=True)
            l1 = np.abs(mid_n).sum(1)
            width = h * l1                      # corners within width/2 of a plane form a face-connected layer
            d = ((q - p1 - 0.5 * s[:, None] * n1) * mid_n).sum(1)   # signed offset from the mid-sheet
            lateral = np.maximum(_lateral(q - p1, n1), _lateral(q - p2, n2))
            near = (np.abs(s) < width) & (lateral <= max_lateral * h)
            layer = near & (np.abs(d) <= 0.5 * width)
            thin = layer & (np.abs(s) >= coincident * h)
            # onto the mid-sheet by the move with the smallest largest component: |d| / l1 <= h/2 per axis
            sdf, disp = 0.5 * s, -(d / l1)[:, None] * np.sign(mid_n)
            keep = thin
            if solid_side is not None:
                same = near & (np.abs(s) < coincident * h)
                if same.any():
                    solid = solid_side(q[same], mid_n[same])
                    sign = np.where(solid, -1.0, 1.0)
                    on = layer[same]
                    sdf[same] = np.where(on, -sign * coincident * h, sign * np.abs(d[same]))
                    disp[same] = np.where(on[:, None], disp[same], 0.0)
                    keep = thin | same
            sel = np.nonzero(keep)[0]
            out_idx.append(cand[sel] + start)
            out_sdf.append(sdf[sel])
            out_disp.append(disp[sel])
        dev = corners.device
        idx = torch.from_numpy(np.concatenate(out_idx) if out_idx else np.zeros(0, np.int64)).to(dev)
        sdf = torch.from_numpy(np.concatenate(out_sdf) if out_sdf else np.zeros(0)).to(dev, corners.dtype)
        disp = torch.from_numpy(np.concatenate(out_disp) if out_disp else np.zeros((0, 3))).to(dev, corners.dtype)
        return idx, sdf, disp


    def _nearest_opposite(self, q: np.ndarray, i1: np.ndarray, found: np.ndarray, radius: float) -> np.ndarray:
        """Index of the nearest sample within ``radius`` of each query whose normal opposes (cos < -0.7) that of its
        nearest sample ``i1``, or -1. Samples are binned by their normal's dominant direction (six KD-trees):
        opposing normals never share a bin, and the nearest neighbours of a densely sampled sheet are all its own."""
        if self._bins is None:
            axis = np.abs(self._N).argmax(1)
            key = axis * 2 + (self._N[np.arange(len(axis)), axis] < 0)
            members = [np.nonzero(key == b)[0] for b in range(6)]
            self._bins = (key, [(m, cKDTree(self._P[m])) if len(m) else None for m in members])
        key, trees = self._bins
        n1 = self._N[i1]
        best = np.full(len(q), np.inf)
        out = np.full(len(q), -1, dtype=np.int64)
        for b, entry in enumerate(trees):
            rows = np.nonzero(found & (key[i1] != b))[0]
            if entry is None or not len(rows):
                continue
            members, tree = entry
            d, j = tree.query(q[rows], k=1, distance_upper_bound=radius, workers=-1)
            ok = np.isfinite(d)
            rows, d, j = rows[ok], d[ok], members[j[ok]]
            better = (d < best[rows]) & ((self._N[j] * n1[rows]).sum(1) < -0.7)
            best[rows[better]], out[rows[better]] = d[better], j[better]
        return out

def _lateral(diff: np.ndarray, n: np.ndarray) -> np.ndarray:
    return np.linalg.norm(diff - (diff * n).sum(1, keepdims=True) * n, axis=1)


def oriented_point_sdf(query: torch.Tensor, points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """``dot(q - p, n)`` with ``(p, n)`` the sampled point nearest to each query ``q`` (one-off; build an
    :class:`OrientedPoints` to query the same samples more than once)."""
    return OrientedPoints(points, normals).sdf(query)


def tangent_distances(points: torch.Tensor, normals: torch.Tensor, idx: np.ndarray,
                      query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed tangent-plane distance and the lateral distance of each query to its sample ``idx``."""
    idx_t = torch.from_numpy(idx).to(points.device)
    p, n = points[idx_t].to(query), normals[idx_t].to(query)
    diff = query - p
    signed = (diff * n).sum(dim=1)
    return signed, (diff - signed[:, None] * n).norm(dim=1)


class ColumnParity:
    """Inside-outside of grid corners of a WATERTIGHT normalised mesh by ray parity, without a dense grid.

    Every grid column ``(x, y)`` at ``resolution`` is a ray along z; its crossings with the triangles are listed
    once (about as many as the surface has voxels) and sorted, so a corner ``(x, y, z)`` is inside when an odd
    number of them lie below it. Columns are shifted by a tiny irrational amount so that no ray passes exactly
    through an edge or a vertex. Parity keeps every surface of the input as a sign change (nested shells alternate,
    parts inside one another keep their inner faces) and, unlike a tangent-plane sign, never changes anywhere but
    at the surface.
    """

    SHIFT = (0.7071067811865e-5, 0.5772156649015e-5)  # voxels

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, resolution: int, chunk: int = 1 << 22):
        r = resolution
        self.resolution = r
        tri = (vertices.detach().cpu().double().numpy()[faces.cpu().numpy()] + 0.5) * r  # grid units
        shift = np.asarray(self.SHIFT)
        a, b, c = (tri[:, i] for i in range(3))
        area2 = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
        keep = area2 != 0  # triangles seen edge-on from the columns are never crossed
        tri, area2 = tri[keep], area2[keep]
        lo = np.ceil(tri[:, :, :2].min(1) - shift).astype(np.int64)
        hi = np.floor(tri[:, :, :2].max(1) - shift).astype(np.int64)
        span = np.maximum(hi - lo + 1, 0)
        count = span[:, 0] * span[:, 1]
        bounds = np.concatenate([[0], np.cumsum(count)])
        cols, zs = [], []
        start = 0
        while start < len(tri):
            end = max(int(np.searchsorted(bounds, bounds[start] + chunk, side="right")) - 1, start + 1)
            t = np.repeat(np.arange(start, end), count[start:end])
            local = np.arange(len(t)) - np.repeat(bounds[start:end] - bounds[start], count[start:end])
            col = lo[t] + np.stack([local // np.maximum(span[t, 1], 1), local % np.maximum(span[t, 1], 1)], 1)
            p = col + shift
            ta, tb, tc = tri[t, 0], tri[t, 1], tri[t, 2]
            hit = _inside_triangle(p, ta, tb, tc, area2[t])
            p, ta, tb, tc, a2 = p[hit], ta[hit], tb[hit], tc[hit], area2[t][hit]
            wb = ((p[:, 0] - ta[:, 0]) * (tc[:, 1] - ta[:, 1]) - (p[:, 1] - ta[:, 1]) * (tc[:, 0] - ta[:, 0])) / a2
            wc = ((tb[:, 0] - ta[:, 0]) * (p[:, 1] - ta[:, 1]) - (tb[:, 1] - ta[:, 1]) * (p[:, 0] - ta[:, 0])) / a2
            zs.append(ta[:, 2] + wb * (tb[:, 2] - ta[:, 2]) + wc * (tc[:, 2] - ta[:, 2]))
            cols.append(self._column(col[hit]))
            start = end
        col = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        z = np.concatenate(zs) if zs else np.zeros(0)
        self._keys = np.sort(self._key(col, z))

    def _key(self, col: np.ndarray, z: np.ndarray) -> np.ndarray:
        """One sortable float per (column, height): columns apart by more than any height (exact to ~1e-6 voxel)."""
        return col * float(self.resolution + 64) + (np.clip(z, -16, self.resolution + 16) + 32)

    def _column(self, xy: np.ndarray) -> np.ndarray:
        return (xy[:, 0] + 8) * (self.resolution + 24) + (xy[:, 1] + 8)

    def inside(self, corners: torch.Tensor) -> torch.Tensor:
        """``[M]`` bool: is each integer grid corner ``[M, 3]`` (at this resolution) inside the mesh?"""
        q = corners.detach().cpu().numpy().astype(np.int64)
        col = self._column(q[:, :2])
        below = (np.searchsorted(self._keys, self._key(col, q[:, 2].astype(np.float64)))
                 - np.searchsorted(self._keys, self._key(col, np.full(len(q), -np.inf))))
        return torch.from_numpy((below & 1).astype(bool)).to(corners.device)


def _inside_triangle(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray, area2: np.ndarray) -> np.ndarray:
    """Does each column ``p [K, 2]`` pass through its triangle's xy projection ``(a, b, c)``?

    Decided edge by edge with the edge's endpoints in a canonical (sorted) order, so the two triangles sharing an
    edge evaluate the very same floating-point expression and exactly one of them takes a column that grazes it (a
    column counted twice or never would flip every corner above it). Exact zeros are broken by symbolically moving
    the column by (eps, eps^2)."""
    inside = np.ones(len(p), dtype=bool)
    ccw = area2 > 0
    for u, v in ((a, b), (b, c), (c, a)):
        swap = (u[:, 0] > v[:, 0]) | ((u[:, 0] == v[:, 0]) & (u[:, 1] > v[:, 1]))
        lo = np.where(swap[:, None], v[:, :2], u[:, :2])
        hi = np.where(swap[:, None], u[:, :2], v[:, :2])
        dx, dy = hi[:, 0] - lo[:, 0], hi[:, 1] - lo[:, 1]
        e = dx * (p[:, 1] - lo[:, 1]) - dy * (p[:, 0] - lo[:, 0])
        left = (e > 0) | ((e == 0) & (dy <= 0))
        inside &= left == (ccw != swap)  # the interior is left of (u, v) in a counter-clockwise triangle
    return inside

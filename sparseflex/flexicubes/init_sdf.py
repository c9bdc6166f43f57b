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
        idx_t = torch.from_numpy(idx).to(self.points.device)
        p, n = self.points[idx_t].to(query), self.normals[idx_t].to(query)
        diff = query - p
        signed = (diff * n).sum(dim=1)
        lateral = (diff - signed[:, None] * n).norm(dim=1)
        return signed, lateral

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

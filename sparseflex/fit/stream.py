"""Streaming nearest-sample queries for ``convert`` (issue 20): the oriented samples answered tile by tile.

:class:`~sparseflex.flexicubes.init_sdf.OrientedPoints` builds one KD-tree over every surface sample, in float64,
plus six more for thin sheets: with the 24M samples of a 1024 fit that is about 3 GB, the peak of ``convert`` and of
a fit's start. :class:`TiledPoints` answers the same queries exactly with trees over one tile of space at a time:
the queries are grouped by a coarse grid of tiles, and each tile's queries go to a tree over the samples within
``margin`` of that tile. A neighbour found there within ``margin`` is the nearest of all samples (any nearer one lies
within ``margin`` of the tile, so it is in the tree); a query with none that near is asked again with
the distance to the nearest sample near the tile as the margin. The thin-sheet search looks only ``2 / R`` around a corner, so a margin of that much makes it exact too.
Only the samples (float32) and one int64 order per sample persist.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..flexicubes.init_sdf import OrientedPoints, tangent_distances


class TiledPoints:
    """Drop-in for :class:`OrientedPoints` (``points``, ``normals``, :meth:`nearest`, :meth:`sdf`,
    :meth:`sdf_and_doubt`, :meth:`thin_sheets`) whose trees cover one tile at a time. ``tiles`` per axis over
    [-0.5, 0.5]^3 (samples and queries outside it go to the border tiles; 0: from the number of samples); ``margin``
    (world units, 0: a sixteenth of a tile) is how far around a tile its tree's samples reach on the first try."""

    def __init__(self, points: torch.Tensor, normals: torch.Tensor, tiles: int = 0, margin: float = 0.0):
        self.points, self.normals = points, normals
        # by default about 200k samples per tile of a surface (one tile, one tree, up to 200k; 11 per axis at 24M)
        tiles = tiles or int(min(max(math.sqrt(len(points) / 200_000), 1), 16))
        margin = margin or 1.0 / (16 * tiles)
        self.tiles, self.margin = tiles, margin
        cell = self._cells(points)
        key = (cell[:, 0] * tiles + cell[:, 1]) * tiles + cell[:, 2]
        self.order = torch.argsort(key).cpu().numpy()
        counts = torch.bincount(key.cpu(), minlength=tiles ** 3).reshape(tiles, tiles, tiles)
        self.ends = torch.cumsum(counts.reshape(-1), 0).reshape(tiles, tiles, tiles).numpy()
        self.counts = counts.numpy()

    def _cells(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.detach().cpu() + 0.5) * self.tiles).floor().long().clamp_(0, self.tiles - 1)

    def _members(self, lo: np.ndarray, hi: np.ndarray, margin: float) -> np.ndarray:
        """Rows of the samples within ``margin`` (per axis) of the box ``[lo, hi]`` (world units)."""
        t0 = np.clip(np.floor((lo - margin + 0.5) * self.tiles), 0, self.tiles - 1).astype(int)
        t1 = np.clip(np.floor((hi + margin + 0.5) * self.tiles), 0, self.tiles - 1).astype(int)
        rows = []
        for x in range(t0[0], t1[0] + 1):
            for y in range(t0[1], t1[1] + 1):
                # tiles (x, y, t0..t1) are consecutive in the order: one slice
                first = int(self.ends[x, y, t0[2]] - self.counts[x, y, t0[2]])
                last = int(self.ends[x, y, t1[2]])
                if last > first:
                    rows.append(self.order[first:last])
        if not rows:
            return np.zeros(0, np.int64)
        rows = np.concatenate(rows)
        # only the samples within the margin of the box: trees hardly larger than one tile's samples
        p = self.points[torch.from_numpy(rows)].detach().cpu().double().numpy()
        return rows[((p >= lo - margin) & (p <= hi + margin)).all(1)]

    def _box(self, tile: tuple[int, int, int], q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tile's box, grown to hold its queries (those outside the cube go to the border tiles)."""
        lo = np.array(tile, dtype=np.float64) / self.tiles - 0.5
        return np.minimum(lo, q.min(0)), np.maximum(lo + 1.0 / self.tiles, q.max(0))

    def _by_tile(self, query: torch.Tensor):
        """(tile, query rows) for every tile holding a query."""
        cell = self._cells(query)
        key = ((cell[:, 0] * self.tiles + cell[:, 1]) * self.tiles + cell[:, 2]).numpy()
        order = np.argsort(key, kind="stable")
        ks = key[order]
        cut = np.flatnonzero(np.diff(ks)) + 1
        for rows in np.split(order, cut):
            if len(rows):
                k = int(key[rows[0]])
                yield (k // self.tiles ** 2, (k // self.tiles) % self.tiles, k % self.tiles), rows

    def _knn(self, query: torch.Tensor, k: int):
        """Yield (query rows, rows ``[len(rows), k]`` of their ``k`` nearest samples), tile by tile: exact, see the
        module's docstring."""
        q_all = query.detach().cpu().double().numpy()
        P = self.points
        for tile, rows in self._by_tile(query):
            lo, hi = self._box(tile, q_all[rows])
            margin = self.margin
            while len(rows):  # ends: past a margin of 2 the members are all samples, and k <= their number
                members = self._members(lo, hi, margin) if margin < 2.0 else np.arange(len(self.order))
                if len(members) < k:
                    margin = 2 * margin + 1.0 / self.tiles  # too few near this tile: widen
                    continue
                tree = cKDTree(P[torch.from_numpy(members)].detach().cpu().double().numpy())
                d, j = tree.query(q_all[rows], k=k)
                d, j = d.reshape(len(rows), k), j.reshape(len(rows), k)
                ok = d[:, -1] <= margin  # no sample outside the members is nearer
                yield rows[ok], members[j[ok]]
                if ok.all():
                    break
                # the true k nearest lie within the distance to the k-th nearest member: one more pass
                rows, margin = rows[~ok], float(d[~ok, -1].max()) * (1 + 1e-9) + 1e-12

    def nearest_index(self, query: torch.Tensor) -> np.ndarray:
        """Row of the sample nearest to each query (exact; see the module's docstring)."""
        out = np.empty(len(query), np.int64)
        for rows, idx in self._knn(query, 1):
            out[rows] = idx[:, 0]
        return out

    def sdf_and_doubt(self, query: torch.Tensor, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`OrientedPoints.sdf_and_doubt`, tile by tile."""
        nearest = np.empty(len(query), np.int64)
        doubt = np.zeros(len(query), dtype=bool)
        q = query.detach().cpu().double().numpy()
        for rows, idx in self._knn(query, min(k, len(self.order))):
            t = torch.from_numpy(idx)
            p = self.points[t].detach().cpu().double().numpy()
            n = self.normals[t].detach().cpu().double().numpy()
            side = ((q[rows][:, None] - p) * n).sum(2) > 0
            nearest[rows] = idx[:, 0]
            doubt[rows] = side.any(1) & ~side.all(1)
        sdf = tangent_distances(self.points, self.normals, nearest, query)[0]
        return sdf, torch.from_numpy(doubt).to(query.device)

    def nearest(self, query: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ARG002
        """As :meth:`OrientedPoints.nearest`: the signed tangent-plane distance and the lateral distance."""
        if len(query) == 0:
            return query.new_zeros(0), query.new_zeros(0)
        return tangent_distances(self.points, self.normals, self.nearest_index(query), query)

    def sdf(self, query: torch.Tensor) -> torch.Tensor:
        return self.nearest(query)[0]

    def thin_sheets(self, corners: torch.Tensor, resolution: int, solid_side=None, **kw):
        """As :meth:`OrientedPoints.thin_sheets`, one tile of corners at a time (its search radius is ``2 / R``, so a
        margin of that much answers it exactly)."""
        margin = max(self.margin, 2.0 / resolution)
        idx, sdf, disp = [], [], []
        q_all = corners.detach().cpu().double().numpy()
        for tile, rows in self._by_tile(corners):
            members = torch.from_numpy(self._members(*self._box(tile, q_all[rows]), margin))
            if len(members) == 0:
                continue
            local = OrientedPoints(self.points[members], self.normals[members])
            i, s, d = local.thin_sheets(corners[torch.from_numpy(rows).to(corners.device)], resolution, solid_side,
                                        **kw)
            idx.append(torch.from_numpy(rows).to(corners.device)[i])
            sdf.append(s)
            disp.append(d)
        if not idx:
            return (torch.zeros(0, dtype=torch.long, device=corners.device), corners.new_zeros(0),
                    corners.new_zeros(0, 3))
        idx, sdf, disp = torch.cat(idx), torch.cat(sdf), torch.cat(disp)
        order = torch.argsort(idx)
        return idx[order], sdf[order], disp[order]


#: From this many samples (convert's default sample at 512^3 and above) the queries are answered tile by tile: one
#: global tree over 24M samples costs gigabytes, while below it the tiles' extra tree builds cost time for little
#: memory (dress at 256, 10M samples, on a loaded machine: 2.07 vs 2.97 GB peak, but 356 vs 115 s).
STREAM_FROM = 16_000_000


def oriented_samples(points: torch.Tensor, normals: torch.Tensor):
    """The oriented-point query object for these samples: :class:`TiledPoints` from :data:`STREAM_FROM` samples,
    else :class:`~sparseflex.flexicubes.init_sdf.OrientedPoints` (the same answers)."""
    if len(points) >= STREAM_FROM:
        return TiledPoints(points, normals)
    return OrientedPoints(points, normals)

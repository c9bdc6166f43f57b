"""Mesh comparison metrics (SPEC section 5) with exact point-to-surface distances.

Protocol of :func:`mesh_metrics`:

1. both meshes are normalised with the GROUND TRUTH's transform (bounding-box centre to 0, longest side to 1);
2. ``num_points`` points are sampled uniformly by area on each surface (all of it: interior and hidden parts too),
   each with its face normal;
3. every sample gets its exact Euclidean distance to the OTHER mesh's triangles (point-to-surface, not to the
   other sample, so the scores have no sampling floor) and the normal of the closest triangle;
4. with ``d_p`` the distances of the prediction's samples to the ground truth and ``d_g`` the reverse:

   - ``chamfer`` = (mean(d_p^2) + mean(d_g^2)) / 2 x 10^4 (squared L2, the magnitude papers report);
   - ``chamfer_l1`` = (mean(d_p) + mean(d_g)) / 2 x 10^4 (unsquared);
   - ``precision@t`` = % of d_p <= t, ``recall@t`` = % of d_g <= t, ``fscore@t`` = their harmonic mean (percent);
   - ``normal_consistency`` = mean over both directions of |cos| between a sample's face normal and the normal of
     the closest triangle on the other mesh (orientation-free);
5. ``ceiling`` holds the same metrics for the ground truth against an independent sample of itself (the best any
   prediction can score under this protocol: about 0 and 100 %).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..data.mesh import Mesh, Normalization
from ..data.sampling import sample_surface
from ..errors import InputError

DEFAULT_POINTS = 1_000_000
THRESHOLDS = (0.001, 0.01)


# point-triangle (or point-node) pairs evaluated at once: every temporary of a query is a small multiple of this,
# whatever the geometry (~300 bytes a pair: under 100 MB)
_PAIRS = 1 << 18
_LEAF = 8          # triangles per leaf of the hierarchy
_REACH = 8         # the KD-tree searches stop at this many h
_WIDEN = (1, 2, 8)  # the fast path asks for k, then 2 k, then 8 k nearest centroids before the hierarchy


class SurfaceDistance:
    """Exact distances from points to a triangle mesh, fast for millions of points, in bounded memory.

    Fast path (points near the surface: nearly all of them when a prediction is compared with its ground truth):
    every triangle is cut into ``m^2`` similar pieces (``m`` grows with its size) whose centroids go into a
    KD-tree; a piece lies within ``h`` (the largest piece radius) of its centroid. A query takes its ``k`` nearest
    centroids within ``reach = 8 h``, computes the exact distance to their triangles and keeps the smallest, ``u``.
    That is the true distance whenever every centroid within ``u + h`` was a candidate (the ``k``-th centroid is
    farther; or fewer than ``k`` lie within the reach and ``u + h`` is below it): the closest point's own piece
    has its centroid within ``h`` of it, hence within ``u + h`` of the query, so its triangle was a candidate.
    Queries failing that certificate ask for ``2 k``, then ``8 k`` centroids.

    Exact fallback (the rest: points far from the surface, deep inside a closed mesh, ...): branch and bound in a
    bounding-volume hierarchy over the triangles (built on first need), depth first, nearer child first. A node is
    bounded by its box and by a cylinder about its best-fit plane (tight on flat and gently curved patches, which a
    tilted box seen from afar bounds loosely), a triangle by its circumscribed disk; either is skipped when the
    point is farther from it than from the best triangle so far (the fast path's, else the first leaf's). What is
    skipped holds nothing closer than what is kept (a slack far above rounding is added), so the result is the
    closest triangle, as a brute-force search over all of them finds it.

    Bounded: the KD-tree searches stop at the reach (a far point's unbounded search sweeps much of the tree); the
    search's (point, node) pairs are taken off a stack in batches of fixed size, each pushing at most two, so the
    stack holds the points plus two batches a level; every distance evaluation takes at most ``_PAIRS`` pairs.
    Memory is the mesh's structures plus the points plus a fixed amount, whatever the geometry. Time grows with the
    number of triangles near-tied for closest: a point near the centre of a sphere visits most of the hierarchy.
    """

    def __init__(self, vertices, faces, pieces_per_face: float = 4.0):
        v = _numpy(vertices, np.float64)
        f = _numpy(faces, np.int64)
        tri = v[f]
        ab, ac = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
        normal = np.cross(ab, ac)
        keep = np.linalg.norm(normal, axis=1) > 0  # a zero-area face adds no surface beyond its neighbours'
        if not keep.any():
            raise InputError("cannot measure distances to a mesh without surface area")
        self.faces = np.flatnonzero(keep)                     # row -> original face index
        tri, ab, ac, normal = tri[keep], ab[keep], ac[keep], normal[keep]
        self.normals = normal / np.linalg.norm(normal, axis=1, keepdims=True)
        aa, g, cc = (ab * ab).sum(1), (ab * ac).sum(1), (ac * ac).sum(1)
        det = aa * cc - g * g
        with np.errstate(divide="ignore", invalid="ignore"):
            # barycentric solve for the interior test; slivers (det ~ rounding) use their edges only
            inv = np.where((det > 1e-12 * aa * cc)[:, None], np.stack([cc, g, aa], 1) / det[:, None], np.nan)
        # one column per face, gathered once per candidate: a, ab, ac, unit normal, Gram entries, inverse Gram
        # (column-major: each quantity of a batch of candidates then lies contiguous)
        self.table = np.ascontiguousarray(np.concatenate([tri[:, 0], ab, ac, self.normals, np.stack([aa, g, cc], 1),
                                                          inv], 1).T)
        self._sliver = np.isnan(inv[:, 0])
        centroid = tri.mean(1)
        self._disk = np.ascontiguousarray(np.concatenate(
            [centroid, np.linalg.norm(tri - centroid[:, None], axis=2).max(1, keepdims=True)], 1).T)
        nodes, self.node_face, self.h = _centroid_nodes(tri, pieces_per_face)
        self.tree = cKDTree(nodes)
        self.reach = _REACH * self.h
        # size of the coordinates: the branch and bound's slack must exceed their rounding
        self._scale = float(np.abs(tri).max() + np.linalg.norm(tri.max((0, 1)) - tri.min((0, 1))))
        self._bvh = None  # the hierarchy, built on first need (the fast path usually settles every point)

    def __len__(self) -> int:
        return len(self.node_face)

    def query(self, points, k: int = 8, chunk: int = 1 << 15) -> tuple[np.ndarray, np.ndarray]:
        """Distance of each point ``[N, 3]`` to the surface and the index of a closest face (numpy arrays)."""
        p = _numpy(points, np.float64).reshape(-1, 3)
        dist, face = np.empty(len(p)), np.empty(len(p), dtype=np.int64)
        for s in range(0, len(p), chunk):
            dist[s:s + chunk], face[s:s + chunk] = self._query(p[s:s + chunk], k)
        return dist, self.faces[face]

    def _query(self, p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        pc = np.ascontiguousarray(p.T)  # [3, N]
        d2, face = np.full(len(p), np.inf), np.zeros(len(p), dtype=np.int64)
        open_, far = np.arange(len(p)), []
        ks = [0] + [min(w * k, len(self)) for w in _WIDEN]
        for lo, hi in zip(ks[:-1], ks[1:]):
            if not len(open_) or hi <= lo:
                break
            still = []
            for rows in _batches(open_, _PAIRS // (hi - lo)):
                node_dist, node = self.tree.query(p[rows], k=range(lo + 1, hi + 1), distance_upper_bound=self.reach,
                                                  workers=-1)
                missing = node >= len(self)  # fewer than asked within the reach
                dd, ff = self._nearest(pc[:, rows], self.node_face[np.where(missing, 0, node)], missing)
                better = dd < d2[rows]
                d2[rows[better]], face[rows[better]] = dd[better], ff[better]
                # certificate: every centroid nearer than the last one returned (than the reach when it returned
                # fewer) was a candidate; the slack absorbs rounding in the tree's distances
                seen = np.where(missing[:, -1], self.reach * (1 - 1e-9), node_dist[:, -1])
                fail = seen <= np.sqrt(d2[rows]) * (1 + 1e-9) + 1e-12 + self.h
                # more neighbours cannot help a point that already has every centroid within the reach
                far.append(rows[fail & missing[:, -1]])
                still.append(rows[fail & ~missing[:, -1]])
            open_ = np.concatenate(still)
        open_ = np.concatenate([open_, *far])
        if len(open_):
            d2[open_], face[open_] = self._exact(pc[:, open_], d2[open_], face[open_])
        return np.sqrt(d2), face

    def _exact(self, pc: np.ndarray, d2: np.ndarray, face: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Branch and bound in the hierarchy: the smallest squared distance from each point ``[3, N]`` to the
        surface and its face (row), given upper bounds ``d2`` (infinite: none) reached by ``face``."""
        if self._bvh is None:  # over the triangles as the table holds them: a, a + ab, a + ac
            a, ab, ac = self.table[0:3].T, self.table[3:6].T, self.table[6:9].T
            self._bvh = _Hierarchy(np.stack([a, a + ab, a + ac], 1))
        bvh, n = self._bvh, pc.shape[1]
        d2, face = d2.copy(), face.copy()
        # the slack (relative to the coordinates' size) is far above the rounding of the bounds and distances,
        # so rounding never skips the closest triangle
        slack = 1e-6 * (np.abs(pc).max(0) + self._scale)
        limit = (np.sqrt(d2) * (1 + 1e-9) + slack) ** 2  # infinite for points with no candidate yet

        def leaves(q, leaf):
            """Measure points ``q`` against the triangles of their leaves ``leaf`` (rows), keeping the nearest."""
            q, f = np.repeat(q, _LEAF), bvh.leaf_faces[leaf].reshape(-1)
            # a triangle is no nearer than its circumscribed disk (centroid, farthest vertex): a few products rule
            # most out, above all where many triangles are near-tied
            disk = self._disk[:, f]
            x, y, z = pc[0, q] - disk[0], pc[1, q] - disk[1], pc[2, q] - disk[2]
            h = x * self.table[9, f] + y * self.table[10, f] + z * self.table[11, f]
            rr = x * x + y * y + z * z
            side = np.maximum(np.sqrt(np.maximum(rr - h * h, 0.0)) - disk[3], 0.0)
            ball = np.maximum(np.sqrt(rr) - disk[3], 0.0)  # all a sliver's unreliable normal allows
            bound = np.where(self._sliver[f], ball * ball, h * h + side * side)
            keep = (bound <= limit[q]) & (f >= 0)
            q, f = q[keep], f[keep]
            dd = self._squared_distance(pc[:, q], f)
            better = dd < d2[q]
            q, dd, f = q[better], dd[better], f[better]
            np.minimum.at(d2, q, dd)  # a point may meet several of its triangles here: keep the nearest
            won = dd == d2[q]
            face[q[won]] = f[won]
            limit[q] = (np.sqrt(d2[q]) * (1 + 1e-9) + slack[q]) ** 2

        # depth first, nearer child first (as a sequential search would): the first leaf a point meets is the one
        # a greedy descent reaches, and every farther sibling waits, to be checked against the bound by then.
        # Stack entries are (point, node, bound) arrays; one taken (at most a batch) pushes two, so the stack
        # holds the points plus at most two batches a level
        batch = _PAIRS // _LEAF
        stack = [(np.arange(n), np.zeros(n, dtype=np.int64), np.zeros(n))]
        while stack:
            q, node, lb = stack.pop()
            if len(q) > batch:
                stack.append((q[batch:], node[batch:], lb[batch:]))
                q, node, lb = q[:batch], node[:batch], lb[:batch]
            alive = lb <= limit[q]
            q, node = q[alive], node[alive]
            child = bvh.child[node]
            inner = child >= 0
            if not inner.all():
                leaves(q[~inner], bvh.leaf_row[node[~inner]])
            if inner.any():
                q, child = q[inner], child[inner]
                lb0, lb1 = bvh.lower_bound(pc[:, q], child), bvh.lower_bound(pc[:, q], child + 1)
                second = lb1 < lb0  # the second child is the nearer
                near, far = child + second, child + ~second
                for node, lb in ((far, np.maximum(lb0, lb1)), (near, np.minimum(lb0, lb1))):  # the nearer on top
                    keep = lb <= limit[q]
                    stack.append((q[keep], node[keep], lb[keep]))
        return d2, face

    def _nearest(self, pc: np.ndarray, cand: np.ndarray, missing: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Smallest squared distance from each point ``[3, N]`` to its candidate faces ``[N, K]`` (rows; none where
        ``missing``), and that face; infinite where a point has no candidate."""
        n, k = cand.shape
        # neighbouring centroids often share a face: measure each (point, face) once (halves the work or better)
        cand = np.sort(cand if missing is None else np.where(missing, -1, cand), axis=1)
        first = np.empty((n, k), dtype=bool)
        first[:, 0] = True
        np.not_equal(cand[:, 1:], cand[:, :-1], out=first[:, 1:])
        if missing is not None:
            first &= cand >= 0
        rows, cols = np.nonzero(first)
        d2 = np.full((n, k), np.inf)
        d2[rows, cols] = self._squared_distance(pc[:, rows], cand[rows, cols])
        best = d2.argmin(1)
        rows = np.arange(n)
        return d2[rows, best], cand[rows, best]

    def squared_distance(self, p: np.ndarray, face: np.ndarray) -> np.ndarray:
        """Exact squared distance from points ``[M, 3]`` to (internal) faces ``[M]``: the distance to the plane when
        the projection falls inside the triangle, else the smallest distance to its three edges."""
        return self._squared_distance(np.asarray(p, dtype=np.float64).T, face)

    def _squared_distance(self, pc: np.ndarray, face: np.ndarray) -> np.ndarray:
        t = self.table[:, face]
        x, y, z = pc[0] - t[0], pc[1] - t[1], pc[2] - t[2]     # ap
        d1 = x * t[3] + y * t[4] + z * t[5]                    # ap . ab
        d2 = x * t[6] + y * t[7] + z * t[8]                    # ap . ac
        pp = x * x + y * y + z * z
        aa, g, cc = t[12], t[13], t[14]
        v = t[15] * d1 - t[16] * d2                             # barycentrics of the projection
        w = t[17] * d2 - t[16] * d1
        inside = (v >= 0) & (w >= 0) & (v + w <= 1)
        plane = x * t[9] + y * t[10] + z * t[11]
        edges = np.minimum(np.minimum(_segment(pp, d1, aa), _segment(pp, d2, cc)),
                           _segment(pp - 2 * d1 + aa, d2 - d1 - g + aa, aa - 2 * g + cc))  # b->c from b
        return np.where(inside, plane * plane, np.maximum(edges, 0.0))


def _segment(pp: np.ndarray, d: np.ndarray, ee: np.ndarray) -> np.ndarray:
    """Squared distance to the segment from the start s along e, given |p - s|^2, (p - s).e and e.e."""
    t = np.clip(d / ee, 0.0, 1.0)
    return pp - t * (2 * d - t * ee)


def _centroid_nodes(tri: np.ndarray, pieces_per_face: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Centroids of the pieces of every triangle, each piece's face, and the largest piece radius ``h``.

    A triangle of radius ``rho`` (farthest vertex from its centroid) is cut into ``m^2`` copies scaled by ``1/m``
    (``m(m+1)/2`` upright, ``m(m-1)/2`` inverted: the inverted ones are point reflections of upright ones, so all
    have radius ``rho / m``), with ``m = ceil(rho / h)``. ``h`` is the smallest radius (by bisection) that keeps the
    pieces within ``pieces_per_face`` per face (at least 2^18): the more uniform the pieces, the fewer candidates a
    query needs.
    """
    centroid = tri.mean(1)
    rho = np.linalg.norm(tri - centroid[:, None], axis=2).max(1)
    budget = max(pieces_per_face * len(tri), 1 << 18)

    def pieces(h):
        m = np.maximum(1, np.ceil(rho / h - 1e-9))
        return m, (m * m).sum()

    lo, hi = float(rho.max()) * 1e-6, float(rho.max())
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if pieces(mid)[1] <= budget else (mid, hi)
    m = pieces(hi)[0].astype(np.int64)
    nodes, node_face = [], []
    ab, ac = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    for mm in np.unique(m):
        sel = np.flatnonzero(m == mm)
        i, j = np.meshgrid(np.arange(mm), np.arange(mm), indexing="ij")
        up, down = i + j <= mm - 1, i + j <= mm - 2
        s = np.concatenate([i[up] + 1 / 3, i[down] + 2 / 3]) / mm
        t = np.concatenate([j[up] + 1 / 3, j[down] + 2 / 3]) / mm
        pts = tri[sel, None, 0] + s[None, :, None] * ab[sel, None] + t[None, :, None] * ac[sel, None]
        nodes.append(pts.reshape(-1, 3))
        node_face.append(np.repeat(sel, len(s)))
    return np.concatenate(nodes), np.concatenate(node_face), float((rho / m).max())


class _Hierarchy:
    """Bounding-volume hierarchy over triangles ``[F, 3, 3]``: splits at the median (rounded to whole leaves) along
    the longest axis of the centroids, leaves of at most ``_LEAF`` triangles. Node ``i`` has children ``child[i]``
    and ``child[i] + 1`` (``-1``: a leaf, whose triangles are ``leaf_faces[leaf_row[i]]``, padded with ``-1``) and
    two bounding volumes: its box, and a cylinder (axis: the normal of the best-fit plane of its vertices;
    half-height, radius), which hugs flat and gently curved patches that a tilted box leaves far too loose."""

    def __init__(self, tri: np.ndarray):
        f = len(tri)
        centroid = tri.mean(1)
        rank = np.empty((3, f), dtype=np.int64)  # rank of each centroid along each axis: sorts a split in one pass
        for a in range(3):
            rank[a, np.argsort(centroid[:, a], kind="stable")] = np.arange(f)
        order = np.arange(f)
        starts, ends, children = [], [], []
        s, e, base = np.zeros(1, dtype=np.int64), np.full(1, f, dtype=np.int64), 0
        while len(s):  # one level at a time, every segment of the level at once
            split = e - s > _LEAF
            child = np.full(len(s), -1, dtype=np.int64)
            child[split] = base + len(s) + 2 * np.arange(split.sum())
            starts.append(s), ends.append(e), children.append(child)
            base += len(s)
            s, e = s[split], e[split]
            if not len(s):
                break
            pos, seg, offset = _ranges(s, e)
            c = centroid[order[pos]]
            axis = (np.maximum.reduceat(c, offset) - np.minimum.reduceat(c, offset)).argmax(1)
            # sort each segment along its axis (the segment index first keeps the segments apart)
            order[pos] = order[pos][np.argsort(seg * f + rank[axis[seg], order[pos]])]
            mid = s + (e - s + 2 * _LEAF - 1) // (2 * _LEAF) * _LEAF  # full leaves, but for one per subtree
            s, e = np.stack([s, mid], 1).ravel(), np.stack([mid, e], 1).ravel()
        self.child = np.concatenate(children)
        start, end = np.concatenate(starts), np.concatenate(ends)
        first = np.cumsum([0] + [len(x) for x in starts])
        levels = [np.arange(a, b) for a, b in zip(first[:-1], first[1:])]
        leaves = np.flatnonzero(self.child < 0)
        self.leaf_row = np.full(len(self.child), -1, dtype=np.int64)
        self.leaf_row[leaves] = np.arange(len(leaves))
        slot = start[leaves, None] + np.arange(_LEAF)
        self.leaf_faces = np.where(slot < end[leaves, None], order[np.minimum(slot, f - 1)], -1)
        # bounding volumes: exact for the leaves, from the children's for the nodes above (O(F) in all)
        vol = np.empty((len(self.child), 14))  # box lo, box hi, cylinder centre, axis, half-height, radius
        count = end - start
        moment = np.empty((len(self.child), 6))       # second moment of a node's vertices about its centre
        pos, seg, offset = _ranges(start[leaves], end[leaves])
        t = tri[order[pos]]
        lo = np.minimum(np.minimum(t[:, 0], t[:, 1]), t[:, 2])
        hi = np.maximum(np.maximum(t[:, 0], t[:, 1]), t[:, 2])
        vol[leaves, 0:3] = np.minimum.reduceat(lo, offset)
        vol[leaves, 3:6] = np.maximum.reduceat(hi, offset)
        centre = np.add.reduceat(t[:, 0] + t[:, 1] + t[:, 2], offset) / (3 * count[leaves, None])
        x = t - centre[seg, None]
        moment[leaves] = np.add.reduceat(sum(_outer(x[:, v], x[:, v]) for v in range(3)), offset)
        axis = _least_spread(moment[leaves])
        n = axis[seg]
        height = np.zeros(len(t))
        radial = np.zeros(len(t))
        for v in range(3):
            h = _dot(x[:, v], n)
            height = np.maximum(height, np.abs(h))
            radial = np.maximum(radial, _dot(x[:, v], x[:, v]) - h * h)
        vol[leaves, 6:9], vol[leaves, 9:12] = centre, axis
        vol[leaves, 12] = np.maximum.reduceat(height, offset)
        vol[leaves, 13] = np.sqrt(np.maximum(np.maximum.reduceat(radial, offset), 0.0))
        # an inner node's cylinder (its own best-fit axis) must contain its children's: bound their extents
        for ids in reversed(levels):
            ids = ids[self.child[ids] >= 0]
            kids = (self.child[ids], self.child[ids] + 1)
            vol[ids, 0:3] = np.minimum(vol[kids[0], 0:3], vol[kids[1], 0:3])
            vol[ids, 3:6] = np.maximum(vol[kids[0], 3:6], vol[kids[1], 3:6])
            w = [count[k, None] / count[ids, None] for k in kids]
            centre = w[0] * vol[kids[0], 6:9] + w[1] * vol[kids[1], 6:9]
            moment[ids] = sum(moment[k] + 3 * count[k, None] * _outer(d, d)
                              for k in kids for d in [vol[k, 6:9] - centre])
            axis = _least_spread(moment[ids])
            height, radial = 0.0, 0.0
            for k in kids:
                c, a, tk, rk = vol[k, 6:9] - centre, vol[k, 9:12], vol[k, 12], vol[k, 13]
                h = _dot(c, axis)
                cos = np.abs(_dot(a, axis))
                sin = np.sqrt(np.maximum(1 - cos * cos, 0.0))
                # a child's point: its centre + up to tk along its axis + up to rk across it
                height = np.maximum(height, np.abs(h) + tk * cos + rk * sin)
                radial = np.maximum(radial, np.sqrt(np.maximum(_dot(c, c) - h * h, 0.0)) + rk + tk * sin)
            vol[ids, 6:9], vol[ids, 9:12] = centre, axis
            vol[ids, 12], vol[ids, 13] = height, radial
        self.table = np.ascontiguousarray(vol.T)  # column-major, as the faces' table

    def lower_bound(self, pc: np.ndarray, node: np.ndarray) -> np.ndarray:
        """Squared distance from points ``[3, M]`` to the bounding volumes of nodes ``[M]``: the larger of the
        distances to the box and to the cylinder (both hold every triangle of the node)."""
        t = self.table[:, node]
        x, y, z = pc[0], pc[1], pc[2]
        ox = np.maximum(t[0] - x, 0.0) + np.maximum(x - t[3], 0.0)
        oy = np.maximum(t[1] - y, 0.0) + np.maximum(y - t[4], 0.0)
        oz = np.maximum(t[2] - z, 0.0) + np.maximum(z - t[5], 0.0)
        box = ox * ox + oy * oy + oz * oz
        x, y, z = x - t[6], y - t[7], z - t[8]
        h = x * t[9] + y * t[10] + z * t[11]
        up = np.maximum(np.abs(h) - t[12], 0.0)
        side = np.maximum(np.sqrt(np.maximum(x * x + y * y + z * z - h * h, 0.0)) - t[13], 0.0)
        return np.maximum(box, up * up + side * side)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of ``[N, 3]`` arrays (faster than a sum over a length-3 axis)."""
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def _outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Symmetric outer products of ``[N, 3]`` rows, as ``[N, 6]`` (xx, xy, xz, yy, yz, zz)."""
    return np.stack([a[:, 0] * b[:, 0], a[:, 0] * b[:, 1], a[:, 0] * b[:, 2], a[:, 1] * b[:, 1], a[:, 1] * b[:, 2],
                     a[:, 2] * b[:, 2]], 1)


def _least_spread(moment: np.ndarray) -> np.ndarray:
    """Unit direction of least spread of second moments ``[N, 6]``: the normal of the best-fit plane."""
    return np.linalg.eigh(moment[:, [0, 1, 2, 1, 3, 4, 2, 4, 5]].reshape(-1, 3, 3))[1][:, :, 0]


def _ranges(s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions in the non-empty ranges ``[s, e)`` one after the other, the range of each, and where each starts."""
    n = e - s
    offset = np.concatenate([[0], np.cumsum(n)[:-1]])
    seg = np.repeat(np.arange(len(s)), n)
    return np.arange(n.sum()) - offset[seg] + s[seg], seg, offset


def _batches(rows: np.ndarray, size: int):
    for i in range(0, len(rows), max(size, 1)):
        yield rows[i:i + max(size, 1)]


def _take(stack: list, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` (point, node) pairs off the top of a stack of pair arrays."""
    qs, nodes, count = [], [], 0
    while stack and count < n:
        q, node = stack.pop()
        if count + len(q) > n:
            cut = n - count
            stack.append((q[cut:], node[cut:]))
            q, node = q[:cut], node[:cut]
        qs.append(q), nodes.append(node)
        count += len(q)
    return np.concatenate(qs), np.concatenate(nodes)


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


# -- metrics ----------------------------------------------------------------------------------------------------------

def mesh_metrics(pred: Mesh, gt: Mesh, num_points: int = DEFAULT_POINTS, thresholds=THRESHOLDS,
                 seed: int = 0, ceiling: bool = True) -> dict:
    """Chamfer distances (x 10^4), precision / recall / F-score (percent) at each threshold and normal consistency
    of ``pred`` against ``gt`` (protocol in the module docstring), plus the ground truth's ``ceiling``.

    An empty prediction (no surface) scores 0 % with ``None`` distances and normal consistency.
    """
    if num_points < 1:
        raise InputError(f"num_points must be positive; got {num_points}")
    norm = Normalization.of(gt)
    gt_n = _normalised(gt, norm)
    pred_n = _normalised(pred, norm)
    gen = torch.Generator().manual_seed(seed)
    gt_pts, gt_nrm, _ = sample_surface(gt_n, num_points, generator=gen)
    gt_surface = SurfaceDistance(gt_n.vertices, gt_n.faces)
    result = {}
    if _has_area(pred_n):
        pred_pts, pred_nrm, _ = sample_surface(pred_n, num_points, generator=gen)
        pred_surface = SurfaceDistance(pred_n.vertices, pred_n.faces)
        result = _scores(pred_pts, pred_nrm, gt_surface, gt_pts, gt_nrm, pred_surface, thresholds)
    else:
        result = _empty_scores(thresholds)
    result["num_points"] = num_points
    if ceiling:
        other_pts, other_nrm, _ = sample_surface(gt_n, num_points, generator=gen)
        result["ceiling"] = _scores(other_pts, other_nrm, gt_surface, gt_pts, gt_nrm, gt_surface, thresholds)
    return result


def _normalised(mesh: Mesh, norm: Normalization) -> Mesh:
    v = mesh.vertices.detach().cpu().double()
    return Mesh(norm.apply(v), mesh.faces.cpu())


def _has_area(mesh: Mesh) -> bool:
    return len(mesh.faces) > 0 and mesh.area > 0


def _scores(pred_pts, pred_nrm, gt_surface: SurfaceDistance, gt_pts, gt_nrm, pred_surface: SurfaceDistance,
            thresholds) -> dict:
    d_p, f_p = gt_surface.query(pred_pts)      # prediction -> ground truth
    d_g, f_g = pred_surface.query(gt_pts)      # ground truth -> prediction
    cos_p = np.abs((_numpy(pred_nrm, np.float64) * gt_surface.normals[_rows(gt_surface, f_p)]).sum(1))
    cos_g = np.abs((_numpy(gt_nrm, np.float64) * pred_surface.normals[_rows(pred_surface, f_g)]).sum(1))
    out = {"chamfer": _sig(((d_p ** 2).mean() + (d_g ** 2).mean()) / 2 * 1e4),
           "chamfer_l1": _sig((d_p.mean() + d_g.mean()) / 2 * 1e4)}
    for t in thresholds:
        precision, recall = 100.0 * (d_p <= t).mean(), 100.0 * (d_g <= t).mean()
        f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        out[f"fscore@{t:g}"] = round(float(f), 4)
        out[f"precision@{t:g}"] = round(float(precision), 4)
        out[f"recall@{t:g}"] = round(float(recall), 4)
    out["normal_consistency"] = round(float((cos_p.mean() + cos_g.mean()) / 2), 6)
    return out


def _empty_scores(thresholds) -> dict:
    out = {"chamfer": None, "chamfer_l1": None}
    for t in thresholds:
        out.update({f"fscore@{t:g}": 0.0, f"precision@{t:g}": 0.0, f"recall@{t:g}": 0.0})
    out["normal_consistency"] = None
    return out


def _rows(surface: SurfaceDistance, faces: np.ndarray) -> np.ndarray:
    """Internal rows of original face indices (zero-area faces are never closest, so all are present)."""
    return np.searchsorted(surface.faces, faces)


def _sig(x: float) -> float:
    return float(f"{float(x):.6g}")

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


class SurfaceDistance:
    """Exact distances from points to a triangle mesh, fast for millions of points.

    Every triangle is cut into ``m^2`` similar pieces (``m`` grows with its size) whose centroids go into a KD-tree;
    a piece lies within ``h`` (the largest piece radius) of its centroid. A query takes its ``k`` nearest
    centroids, computes the exact distance to their triangles and keeps the smallest, ``u``. That is the true
    distance whenever the ``k``-th centroid is farther than ``u + h``: the closest point's own piece has its
    centroid within ``h`` of it, hence within ``u + h`` of the query, so its triangle was among the candidates.
    Queries failing that certificate count the centroids within ``u + h`` and are repeated with that many
    neighbours, so the result is always exact.
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
        # one row per face, gathered once per candidate: a, ab, ac, unit normal, Gram entries, inverse Gram
        self.table = np.concatenate([tri[:, 0], ab, ac, self.normals, np.stack([aa, g, cc], 1), inv], 1)
        nodes, self.node_face, self.h = _centroid_nodes(tri, pieces_per_face)
        self.tree = cKDTree(nodes)

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
        k = min(k, len(self))
        node_dist, node = self.tree.query(p, k=k, workers=-1)
        node_dist, node = node_dist.reshape(len(p), k), node.reshape(len(p), k)
        d2, face = self._nearest(p, self.node_face[node])
        dist = np.sqrt(d2)
        # certificate (the slack absorbs rounding in the tree's distances); else count what it needs
        radius = dist * (1 + 1e-9) + 1e-12 + self.h
        open_ = np.flatnonzero((node_dist[:, -1] <= radius) & (k < len(self)))
        if len(open_):
            need = self.tree.query_ball_point(p[open_], radius[open_], return_length=True, workers=-1)
            bucket = np.maximum(k, 2 ** np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))
            for kk in np.unique(bucket):
                rows = open_[bucket == kk]
                kk = int(min(kk, len(self)))
                if kk <= k:  # every centroid within the radius was already a candidate
                    continue
                _, more = self.tree.query(p[rows], k=range(k + 1, kk + 1), workers=-1)
                d2_more, face_more = self._nearest(p[rows], self.node_face[more.reshape(len(rows), -1)])
                better = d2_more < d2[rows]
                d2[rows[better]], face[rows[better]] = d2_more[better], face_more[better]
            dist = np.sqrt(d2)
        return dist, face

    def _nearest(self, p: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Smallest squared distance from each point ``[N, 3]`` to its candidate faces ``[N, K]``, and that face."""
        n, k = cand.shape
        d2 = self.squared_distance(np.repeat(p, k, axis=0), cand.reshape(-1)).reshape(n, k)
        best = d2.argmin(1)
        rows = np.arange(n)
        return d2[rows, best], cand[rows, best]

    def squared_distance(self, p: np.ndarray, face: np.ndarray) -> np.ndarray:
        """Exact squared distance from points ``[M, 3]`` to (internal) faces ``[M]``: the distance to the plane when
        the projection falls inside the triangle, else the smallest distance to its three edges."""
        t = self.table[face]
        ap = p - t[:, 0:3]
        x, y, z = ap[:, 0], ap[:, 1], ap[:, 2]
        d1 = x * t[:, 3] + y * t[:, 4] + z * t[:, 5]           # ap . ab
        d2 = x * t[:, 6] + y * t[:, 7] + z * t[:, 8]           # ap . ac
        pp = x * x + y * y + z * z
        aa, g, cc = t[:, 12], t[:, 13], t[:, 14]
        v = t[:, 15] * d1 - t[:, 16] * d2                       # barycentrics of the projection
        w = t[:, 17] * d2 - t[:, 16] * d1
        inside = (v >= 0) & (w >= 0) & (v + w <= 1)
        plane = x * t[:, 9] + y * t[:, 10] + z * t[:, 11]
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

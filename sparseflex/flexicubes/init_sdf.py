"""Corner SDF from oriented surface points: the signed distance to the tangent plane of the nearest sample.

Unlike inside/outside tests (winding numbers, flood fill), this needs no watertight input: it works for closed, open
and nested surfaces alike, because only the local side of the nearest surface matters.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree


def oriented_point_sdf(query: torch.Tensor, points: torch.Tensor, normals: torch.Tensor,
                       chunk: int = 1 << 20) -> torch.Tensor:
    """``dot(q - p, n)`` with ``(p, n)`` the sampled point nearest to each query ``q``; same device/dtype as ``query``.

    The KD-tree search runs on the CPU (scipy); results are moved back to the query's device.
    """
    tree = cKDTree(points.detach().cpu().double().numpy())
    q = query.detach().cpu().double().numpy()
    idx = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), chunk):
        idx[start:start + chunk] = tree.query(q[start:start + chunk], k=1, workers=-1)[1]
    idx_t = torch.from_numpy(idx).to(points.device)
    p, n = points[idx_t].to(query), normals[idx_t].to(query)
    return ((query - p) * n).sum(dim=1)

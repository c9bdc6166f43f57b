"""Corner SDF from oriented surface points: the signed distance to the tangent plane of the nearest sample.

Unlike inside/outside tests (winding numbers, flood fill), this needs no watertight input: it works for closed, open
and nested surfaces alike, because only the local side of the nearest surface matters.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree


def nearest_oriented(query: torch.Tensor, points: torch.Tensor, normals: torch.Tensor,
                     chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query ``q`` and its nearest sample ``(p, n)``: the signed tangent-plane distance ``dot(q - p, n)``
    and the lateral distance (how far ``q`` lies sideways of ``p`` along the tangent plane, large past the
    boundary of an open surface). The KD-tree search runs on the CPU (scipy); results return to the query's device.
    """
    tree = cKDTree(points.detach().cpu().double().numpy())
    q = query.detach().cpu().double().numpy()
    idx = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), chunk):
        idx[start:start + chunk] = tree.query(q[start:start + chunk], k=1, workers=-1)[1]
    idx_t = torch.from_numpy(idx).to(points.device)
    p, n = points[idx_t].to(query), normals[idx_t].to(query)
    diff = query - p
    signed = (diff * n).sum(dim=1)
    lateral = (diff - signed[:, None] * n).norm(dim=1)
    return signed, lateral


def oriented_point_sdf(query: torch.Tensor, points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """``dot(q - p, n)`` with ``(p, n)`` the sampled point nearest to each query ``q``."""
    return nearest_oriented(query, points, normals)[0]

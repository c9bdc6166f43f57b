"""Topology statistics of triangle meshes: edge use, boundary loops, Euler characteristic, components.

Used by tests (closedness, manifoldness, orientation) and by dataset statistics.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def _faces_np(faces) -> np.ndarray:
    return faces.detach().cpu().numpy() if isinstance(faces, torch.Tensor) else np.asarray(faces)


def undirected_edges(faces) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected edges ``[E, 2]`` and how many faces use each."""
    f = _faces_np(faces).astype(np.int64)
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    key = e[:, 0] * (int(f.max(initial=0)) + 1) + e[:, 1]
    _, idx, counts = np.unique(key, return_index=True, return_counts=True)
    return e[idx], counts


def boundary_edges(faces) -> np.ndarray:
    """Edges used by exactly one face."""
    e, c = undirected_edges(faces)
    return e[c == 1]


def is_edge_manifold(faces) -> bool:
    """No edge is shared by more than two faces."""
    return bool((undirected_edges(faces)[1] <= 2).all())


def is_consistently_oriented(faces) -> bool:
    """No directed edge appears twice (neighbouring faces traverse their shared edge in opposite directions)."""
    f = _faces_np(faces).astype(np.int64)
    d = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    key = d[:, 0] * (int(f.max(initial=0)) + 1) + d[:, 1]
    return len(np.unique(key)) == len(key)


def euler_characteristic(faces, num_vertices: int | None = None) -> int:
    """V - E + F over the vertices the faces use."""
    f = _faces_np(faces)
    v = len(np.unique(f)) if num_vertices is None else num_vertices
    return int(v - len(undirected_edges(f)[0]) + len(f))


def num_components(faces) -> int:
    """Connected components of the faces (vertices shared)."""
    f = _faces_np(faces).astype(np.int64)
    if len(f) == 0:
        return 0
    used, inv = np.unique(f, return_inverse=True)
    inv = inv.reshape(-1, 3)
    rows = np.concatenate([inv[:, 0], inv[:, 1]])
    cols = np.concatenate([inv[:, 1], inv[:, 2]])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(used), len(used)))
    return int(connected_components(graph, directed=False)[0])


def num_boundary_loops(faces) -> int:
    """Number of connected loops formed by the boundary edges."""
    b = boundary_edges(faces)
    if len(b) == 0:
        return 0
    used, inv = np.unique(b, return_inverse=True)
    inv = inv.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(inv)), (inv[:, 0], inv[:, 1])), shape=(len(used), len(used)))
    return int(connected_components(graph, directed=False)[0])


def signed_volume(vertices, faces) -> float:
    """Signed enclosed volume (positive for closed meshes with outward normals)."""
    v = vertices.detach().cpu().double().numpy() if isinstance(vertices, torch.Tensor) else np.asarray(vertices)
    tri = v[_faces_np(faces)]
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)

"""Topology statistics of triangle meshes: edge use, boundary loops, Euler characteristic, components.

Used by tests (closedness, manifoldness, orientation), by dataset statistics and by the topology check that
``convert`` and ``fit`` report (:func:`topology`, :func:`topology_report`), which welds coincident vertices first:
a UV or normal seam splits vertices without opening the surface.
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


def weld(vertices, faces, tolerance: float = 1e-9) -> np.ndarray:
    """Faces ``[F', 3]`` re-indexed so that vertices closer than about ``tolerance`` times the mesh's extent share
    one index, the first of them (exact duplicates always do), without the faces that collapse to an edge or a
    point."""
    v = vertices.detach().cpu().double().numpy() if isinstance(vertices, torch.Tensor) else np.asarray(vertices,
                                                                                                         np.float64)
    f = _faces_np(faces).astype(np.int64)
    if len(f) == 0:
        return f.reshape(0, 3)
    used = np.unique(f)
    extent = float(np.ptp(v[used], axis=0).max()) or 1.0
    q = np.round(v / (tolerance * extent)).astype(np.int64)
    _, first, inverse = np.unique(q, axis=0, return_index=True, return_inverse=True)
    f = first[inverse.reshape(-1)][f]  # each vertex replaced by the first one at its position
    return f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]


def topology(vertices, faces) -> dict:
    """Topology of a triangle mesh after welding (:func:`weld`): ``watertight`` (every edge used by exactly two
    faces), ``boundary_edges``, ``boundary_loops``, ``nonmanifold_edges`` (used by more than two faces),
    ``components`` (sharing vertices) and ``faces``."""
    f = weld(vertices, faces)
    if len(f) == 0:
        return {"watertight": False, "boundary_edges": 0, "boundary_loops": 0, "nonmanifold_edges": 0,
                "components": 0, "faces": 0}
    _, counts = undirected_edges(f)
    boundary, nonmanifold = int((counts == 1).sum()), int((counts > 2).sum())
    return {"watertight": boundary == 0 and nonmanifold == 0, "boundary_edges": boundary,
            "boundary_loops": num_boundary_loops(f), "nonmanifold_edges": nonmanifold,
            "components": num_components(f), "faces": len(f)}


def topology_report(output, reference, names: tuple[str, str] = ("output", "input")) -> dict:
    """The output's topology against its reference's: ``{"input": ..., "output": ..., "differences": [...]}``
    (keys from ``names``: output's, reference's), each difference one sentence (watertightness, boundary loops,
    components, non-manifold edges the reference lacks).

    ``output`` and ``reference`` are meshes with ``vertices`` and ``faces`` (any frame: welding is relative)."""
    out_name, ref_name = names
    got, ref = (topology(m.vertices, m.faces) for m in (output, reference))
    diff = []
    if got["watertight"] != ref["watertight"]:
        diff.append(f"the {ref_name} is {'' if ref['watertight'] else 'not '}watertight, the {out_name} is "
                    f"{'' if got['watertight'] else 'not '}({got['boundary_edges']} boundary edges, "
                    f"{got['nonmanifold_edges']} non-manifold)")
    if got["boundary_loops"] != ref["boundary_loops"]:
        diff.append(f"boundary loops: {ref_name} {ref['boundary_loops']}, {out_name} {got['boundary_loops']}")
    if got["components"] != ref["components"]:
        diff.append(f"components: {ref_name} {ref['components']}, {out_name} {got['components']}")
    if got["nonmanifold_edges"] > ref["nonmanifold_edges"]:
        diff.append(f"non-manifold edges: {ref_name} {ref['nonmanifold_edges']}, {out_name} "
                    f"{got['nonmanifold_edges']}")
    return {ref_name: ref, out_name: got, "differences": diff}


def topology_warning(report: dict) -> str | None:
    """One line saying how the topology differs (from :func:`topology_report`), or None when it does not."""
    if not report["differences"]:
        return None
    return "warning: the topology differs from the input: " + "; ".join(report["differences"])

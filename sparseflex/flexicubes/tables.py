"""FlexiCubes (dual marching cubes) case tables, generated at import time from the rule in SPEC section 2.

For every case id c (bit i set when corner i is inside, s < 0), each crossing edge is linked to the crossing edges it
shares a face with: a face with two crossing edges links them; an ambiguous face (four crossing edges, diagonal
corners alike) links the two edges meeting at each inside corner. Every crossing edge lies on two faces, so the links
form disjoint cycles; each cycle is one surface patch with one dual vertex.
"""

from __future__ import annotations

import torch

from ..sparse.coords import CORNER_OFFSETS

#: The 12 voxel edges as corner pairs (SPEC section 1). 0,2,4,6 run along x; 1,3,5,7 along z; 8..11 along y.
EDGE_CORNERS = torch.tensor([[0, 1], [1, 5], [4, 5], [0, 4], [2, 3], [3, 7],
                             [6, 7], [2, 6], [2, 0], [3, 1], [7, 5], [6, 4]], dtype=torch.long)

MAX_PATCHES = 4
MAX_PATCH_EDGES = 7


def _edge_axis(e: int) -> int:
    a, b = EDGE_CORNERS[e].tolist()
    return int((CORNER_OFFSETS[a] != CORNER_OFFSETS[b]).nonzero()[0])


#: Axis (0 x, 1 y, 2 z) of each edge.
EDGE_AXIS = torch.tensor([_edge_axis(e) for e in range(12)], dtype=torch.long)

#: The 6 faces as (axis, side): face f = 2 * axis + side lies at offset `side` along `axis`.
FACE_EDGES = torch.tensor([
    [e for e in range(12)
     if all(int(CORNER_OFFSETS[c, f // 2]) == f % 2 for c in EDGE_CORNERS[e].tolist())]
    for f in range(6)], dtype=torch.long)

#: Integer step from a voxel to its neighbour across face f.
FACE_NORMALS = torch.tensor([[(-1 if f % 2 == 0 else 1) if a == f // 2 else 0 for a in range(3)]
                             for f in range(6)], dtype=torch.long)


def _case_patches(case: int) -> tuple[list[list[int]], list[int]]:
    """Patches of one case (each an ordered cycle of edges) and the list of its ambiguous faces."""
    inside = [(case >> i) & 1 == 1 for i in range(8)]
    crossing = [inside[a] != inside[b] for a, b in EDGE_CORNERS.tolist()]
    links: dict[int, list[int]] = {e: [] for e in range(12) if crossing[e]}
    ambiguous = []
    for f in range(6):
        edges = [e for e in FACE_EDGES[f].tolist() if crossing[e]]
        if len(edges) == 2:
            pairs = [edges]
        elif len(edges) == 4:
            ambiguous.append(f)
            face_corners = {c for e in edges for c in EDGE_CORNERS[e].tolist()}
            pairs = [[e for e in edges if c in EDGE_CORNERS[e].tolist()] for c in sorted(face_corners) if inside[c]]
        else:
            pairs = []
        for a, b in pairs:
            links[a].append(b)
            links[b].append(a)
    patches, seen = [], set()
    for start in links:
        if start in seen:
            continue
        cycle, prev, cur = [start], None, start
        seen.add(start)
        while True:  # walk the cycle: each edge has exactly two links
            nxt = links[cur][0] if links[cur][0] != prev else links[cur][1]
            if nxt == start:
                break
            cycle.append(nxt)
            seen.add(nxt)
            prev, cur = cur, nxt
        patches.append(cycle)
    return patches, ambiguous


def _build():
    patch_edges = torch.full((256, MAX_PATCHES, MAX_PATCH_EDGES), -1, dtype=torch.long)
    edge_patch = torch.full((256, 12), -1, dtype=torch.long)
    num_patches = torch.zeros(256, dtype=torch.long)
    ambiguous_face = torch.full((256,), -1, dtype=torch.long)
    for case in range(256):
        patches, ambiguous = _case_patches(case)
        num_patches[case] = len(patches)
        for p, cycle in enumerate(patches):
            patch_edges[case, p, :len(cycle)] = torch.tensor(cycle)
            edge_patch[case, cycle] = p
        if len(ambiguous) == 1 and len(patches) == 1:
            ambiguous_face[case] = ambiguous[0]
    return patch_edges, edge_patch, num_patches, ambiguous_face


#: PATCH_EDGES[c, p] lists the edges of patch p of case c as a cycle (-1 padded).
#: EDGE_PATCH[c, e] is the patch of case c that edge e belongs to (-1 when e does not cross).
#: NUM_PATCHES[c] is the number of dual vertices of case c.
#: AMBIGUOUS_FACE[c] is the single ambiguous face of the 36 cases that need the ambiguity fix, -1 otherwise.
PATCH_EDGES, EDGE_PATCH, NUM_PATCHES, AMBIGUOUS_FACE = _build()

#: CROSSING_EDGES[c, e]: edge e of case c has corners of opposite signs.
CROSSING_EDGES = EDGE_PATCH >= 0

"""The generated FlexiCubes tables against the published counts and the face-linking rule."""

from collections import Counter

import torch

from sparseflex.flexicubes.tables import (AMBIGUOUS_FACE, CROSSING_EDGES, EDGE_AXIS, EDGE_CORNERS, EDGE_PATCH,
                                          FACE_EDGES, NUM_PATCHES, PATCH_EDGES)
from sparseflex.sparse.coords import CORNER_OFFSETS


def test_edge_conventions():
    assert EDGE_AXIS.tolist() == [0, 2, 0, 2, 0, 2, 0, 2, 1, 1, 1, 1]
    for e in range(8, 12):  # y edges point from high y to low y
        a, b = EDGE_CORNERS[e].tolist()
        assert CORNER_OFFSETS[a, 1] == 1 and CORNER_OFFSETS[b, 1] == 0
    # each face holds 4 edges, each edge lies on exactly 2 faces
    assert FACE_EDGES.shape == (6, 4)
    assert Counter(FACE_EDGES.reshape(-1).tolist()) == {e: 2 for e in range(12)}


def test_published_dual_vertex_counts():
    assert Counter(NUM_PATCHES.tolist()) == {0: 2, 1: 162, 2: 82, 3: 8, 4: 2}
    assert NUM_PATCHES[105] == 4 and NUM_PATCHES[150] == 4


def test_published_patch_sizes():
    sizes = (PATCH_EDGES >= 0).sum(-1)[PATCH_EDGES[:, :, 0] >= 0]
    assert Counter(sizes.tolist()) == {3: 144, 4: 66, 5: 72, 6: 52, 7: 24}


def test_every_patch_is_a_closed_cycle_of_crossing_edges():
    face_of = [set(f for f in range(6) if e in FACE_EDGES[f].tolist()) for e in range(12)]
    for case in range(256):
        inside = [(case >> i) & 1 for i in range(8)]
        crossing = {e for e, (a, b) in enumerate(EDGE_CORNERS.tolist()) if inside[a] != inside[b]}
        assert set(CROSSING_EDGES[case].nonzero().squeeze(1).tolist()) == crossing
        covered = []
        for p in range(int(NUM_PATCHES[case])):
            cycle = [e for e in PATCH_EDGES[case, p].tolist() if e >= 0]
            assert len(cycle) >= 3
            for a, b in zip(cycle, cycle[1:] + cycle[:1]):
                assert face_of[a] & face_of[b], f"case {case}: edges {a},{b} of a patch share no face"
            assert all(EDGE_PATCH[case, e] == p for e in cycle)
            covered += cycle
        assert sorted(covered) == sorted(crossing)  # every crossing edge in exactly one patch


def test_ambiguity_cases():
    amb = (AMBIGUOUS_FACE >= 0).nonzero().squeeze(1).tolist()
    assert len(amb) == 36
    for c in amb:
        assert NUM_PATCHES[c] == 1
        # the complement has the same crossing edges and resolves the face the other way: two patches
        assert torch.equal(CROSSING_EDGES[c], CROSSING_EDGES[255 - c])
        assert NUM_PATCHES[255 - c] == 2
        # the ambiguous face has 4 crossing edges
        assert CROSSING_EDGES[c, FACE_EDGES[AMBIGUOUS_FACE[c]]].all()

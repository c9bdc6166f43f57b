"""Voxel-set operations of sparseflex.sparse.coords against plain Python sets."""

import itertools

import pytest
import torch

import sparseflex.sparse.coords as coords_module
from sparseflex.sparse.coords import dilate


@pytest.mark.parametrize("radius, resolution, chunk", [(1, None, 1 << 23), (1, 12, 27 * 5), (2, 12, 125 * 3),
                                                        (1, None, 1)])
def test_dilate_equals_the_set_of_neighbours(radius, resolution, chunk, monkeypatch):
    """Every voxel within Chebyshev distance ``radius`` of one in the set, once, sorted by key; the same whatever the
    chunk of neighbour keys formed at once (one voxel's worth, a few voxels', all)."""
    monkeypatch.setattr(coords_module, "_DILATE_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    xyz = torch.randint(0, 12, (60, 3), generator=g)
    batch = torch.randint(0, 2, (60, 1), generator=g)
    coords = torch.cat([batch, xyz], 1)
    want = set()
    for b, x, y, z in coords.tolist():
        for d in itertools.product(range(-radius, radius + 1), repeat=3):
            p = (x + d[0], y + d[1], z + d[2])
            if resolution is None or all(0 <= c < resolution for c in p):
                want.add((b, *p))
    got = dilate(coords, radius, resolution)
    assert sorted(map(tuple, got.tolist())) == sorted(want) == list(map(tuple, got.tolist()))

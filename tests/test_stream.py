"""Streaming convert (issue 20): tile-by-tile nearest-sample queries give the same SparseFlex as one global tree."""

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from sparseflex.data.mesh import Mesh, normalize
from sparseflex.data.sampling import sample_surface
from sparseflex.fit.convert import mesh_to_sparseflex
from sparseflex.fit.stream import TiledPoints
from sparseflex.flexicubes.init_sdf import OrientedPoints


def thin_plate_and_sphere():
    """A sphere and a plate thinner than a voxel at 64 (thin_sheets moves corners onto its mid-sheet)."""
    sphere = trimesh.creation.icosphere(3, radius=0.25)
    sphere.apply_translation([-0.15, 0, 0])
    plate = trimesh.creation.box([0.004, 0.5, 0.6])
    plate.apply_translation([0.3, 0, 0])
    m = trimesh.util.concatenate([sphere, plate])
    return normalize(Mesh.from_trimesh(m))[0]


def samples_of(mesh, n=60_000, seed=0):
    p, nrm, _ = sample_surface(mesh, n, generator=torch.Generator().manual_seed(seed))
    return p, nrm


def test_tiled_nearest_is_the_global_nearest():
    mesh = thin_plate_and_sphere()
    p, n = samples_of(mesh)
    g = torch.Generator().manual_seed(1)
    # queries near the surface, far from it, and outside the unit cube
    q = torch.cat([p[:5000] + 0.01 * torch.randn(5000, 3, generator=g), torch.rand(40, 3, generator=g) - 0.5,
                   1.5 * (torch.rand(10, 3, generator=g) - 0.5)])
    tiled = TiledPoints(p, n, tiles=6, margin=1 / 128)
    d_tiled = np.linalg.norm(q.double().numpy() - p[tiled.nearest_index(q)].double().numpy(), axis=1)
    d_global = cKDTree(p.double().numpy()).query(q.double().numpy(), k=1)[0]
    np.testing.assert_allclose(d_tiled, d_global, rtol=0, atol=1e-12)
    s1, l1 = tiled.nearest(q)
    s0, l0 = OrientedPoints(p, n).nearest(q)
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-6)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-6)
    # with the side check of the 16 nearest: the thin plate's two sheets disagree near it
    (s2, mixed), (s3, want) = tiled.sdf_and_doubt(q), OrientedPoints(p, n).sdf_and_doubt(q)
    torch.testing.assert_close(s2, s0, rtol=0, atol=1e-6)
    torch.testing.assert_close(s3, s0, rtol=0, atol=0)
    assert torch.equal(mixed, want) and 100 < int(mixed.sum()) < len(q) // 2


@pytest.mark.parametrize("resolution", [32, 64])
def test_streamed_convert_equals_the_current_convert(resolution):
    mesh = thin_plate_and_sphere()
    p, n = samples_of(mesh)
    ref = mesh_to_sparseflex(mesh, resolution, samples=OrientedPoints(p, n))
    got = mesh_to_sparseflex(mesh, resolution, samples=TiledPoints(p, n, tiles=4))
    assert torch.equal(got.coords, ref.coords)
    torch.testing.assert_close(got.sdf, ref.sdf, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.deform, ref.deform, rtol=0, atol=1e-6)
    assert (ref.deform != 0).any(1).sum() > 50  # the thin plate's corners were moved: that path is compared too


def test_side_check_with_fewer_samples_than_it_asks_for():
    """Five samples, sixteen asked for: every sample is used, in one tree and tile by tile alike."""
    p = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.2, 0.2, 0.01], [0.3, 0.0, 0.0]])
    n = torch.tensor([[0.0, 0.0, 1.0]] * 4 + [[0.0, 0.0, -1.0]])
    q = torch.tensor([[0.05, 0.05, 0.2], [0.4, 0.4, -0.3]])
    want = torch.tensor([True, True])  # the last sample faces the other way: every query is in doubt
    for points in (OrientedPoints(p, n), TiledPoints(p, n, tiles=3)):
        sdf, doubt = points.sdf_and_doubt(q)
        assert torch.equal(doubt, want)
        torch.testing.assert_close(sdf, OrientedPoints(p, n).sdf(q))


def test_large_samples_are_tiled_small_ones_use_one_tree(monkeypatch):
    from sparseflex.fit import stream
    p = torch.rand(1000, 3) - 0.5
    n = torch.nn.functional.normalize(torch.randn(1000, 3), dim=1)
    assert isinstance(stream.oriented_samples(p, n), OrientedPoints)
    monkeypatch.setattr(stream, "STREAM_FROM", 1000)
    assert isinstance(stream.oriented_samples(p, n), TiledPoints)

"""Sparse FlexiCubes extraction on analytic SDFs: topology, orientation, accuracy, sparse == dense, gradients."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from sparseflex.eval.topology import (boundary_edges, euler_characteristic, is_consistently_oriented,
                                      is_edge_manifold, num_boundary_loops, num_components, signed_volume)
from sparseflex.flexicubes import SparseFlex, extract_surface, sdf_sign_loss
from sparseflex.flexicubes.representation import deform_for, max_displacement
from sparseflex.sparse import dense_grid, dilate


def sphere(r, c=(0.0, 0.0, 0.0)):
    return lambda p: (p - p.new_tensor(c)).norm(dim=1) - r


def torus(big=0.25, small=0.1):
    return lambda p: torch.stack([p[:, :2].norm(dim=1) - big, p[:, 2]], 1).norm(dim=1) - small


def nested_shells(outer=0.35, inner=0.2):
    # inside (s < 0) between the two radii: two closed shells, the inner one facing the cavity
    return lambda p: torch.maximum(p.norm(dim=1) - outer, inner - p.norm(dim=1))


def band(fn, resolution, width=1.5):
    """Voxels whose centre lies within `width` voxels of the zero set (a narrow band, as a real SparseFlex holds)."""
    coords = dense_grid(resolution)
    centres = (coords[:, 1:].double() + 0.5) / resolution - 0.5
    return coords[fn(centres).abs() < width / resolution]


def check_closed(ex, chi, components=1):
    f = ex.faces
    assert torch.isfinite(ex.vertices).all()
    assert (f >= 0).all() and (f < len(ex.vertices)).all()
    assert (f[:, 0] != f[:, 1]).all() and (f[:, 1] != f[:, 2]).all() and (f[:, 0] != f[:, 2]).all()
    assert len(boundary_edges(f)) == 0
    assert is_edge_manifold(f)
    assert is_consistently_oriented(f)
    assert euler_characteristic(f) == chi
    assert num_components(f) == components


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_sphere_closed_outward_and_accurate(resolution):
    fn = sphere(0.31)
    sf = SparseFlex.from_sdf(band(fn, resolution), resolution, fn)
    ex = sf.extract()
    check_closed(ex, chi=2)
    assert signed_volume(ex.vertices, ex.faces) > 0  # outward: normals towards s > 0
    assert fn(ex.vertices).abs().max() < 0.5 / resolution


@pytest.mark.parametrize("resolution", [32, 96])
def test_torus_has_euler_characteristic_zero(resolution):
    fn = torus()
    ex = SparseFlex.from_sdf(band(fn, resolution), resolution, fn).extract()
    check_closed(ex, chi=0)
    assert signed_volume(ex.vertices, ex.faces) > 0
    assert fn(ex.vertices).abs().max() < 0.5 / resolution


def test_nested_spheres_give_two_shells():
    fn = nested_shells()
    r = 48
    ex = SparseFlex.from_sdf(band(fn, r), r, fn).extract()
    check_closed(ex, chi=4, components=2)
    # the enclosed volume is the shell between the two spheres
    expected = 4 / 3 * np.pi * (0.35 ** 3 - 0.2 ** 3)
    assert signed_volume(ex.vertices, ex.faces) == pytest.approx(expected, rel=0.02)


def test_plane_on_disc_band_gives_open_disc():
    r = 64
    fn = lambda p: p[:, 2] - 0.013  # noqa: E731
    coords = dense_grid(r)
    c = (coords[:, 1:].double() + 0.5) / r - 0.5
    disc = (c[:, 2].sub(0.013).abs() < 1.5 / r) & (c[:, :2].norm(dim=1) < 0.3)
    ex = SparseFlex.from_sdf(coords[disc], r, fn).extract()
    f = ex.faces
    assert is_edge_manifold(f) and is_consistently_oriented(f)
    assert num_components(f) == 1
    assert num_boundary_loops(f) == 1
    assert euler_characteristic(f) == 1  # a disc
    assert (ex.vertices[:, 2] - 0.013).abs().max() < 1e-6
    normals = torch.cross(ex.vertices[f[:, 1]] - ex.vertices[f[:, 0]], ex.vertices[f[:, 2]] - ex.vertices[f[:, 0]], dim=1)
    assert (normals[:, 2] > 0).all()  # towards s > 0 (+z)
    area = normals.norm(dim=1).sum() / 2
    assert 0.85 * np.pi * 0.3 ** 2 < area < 1.05 * np.pi * 0.3 ** 2


def test_random_field_is_edge_manifold_and_oriented():
    r = 12
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        sdf = torch.randn((r + 1) ** 3, generator=g)
        sf = SparseFlex.from_sdf(dense_grid(r), r, lambda p: sdf)
        f = sf.extract().faces
        assert is_edge_manifold(f) and is_consistently_oriented(f)


def canonical_faces(ex, decimals=6):
    """Faces as rows of 9 rounded coordinates, each rotated to start at its smallest vertex, sorted."""
    v = np.round(ex.vertices.detach().double().numpy(), decimals)
    tri = v[ex.faces.numpy()]
    keys = [tuple(map(tuple, t)) for t in tri]
    out = []
    for k in keys:
        i = min(range(3), key=lambda j: k[j])
        out.append(k[i:] + k[:i])
    return sorted(out)


@pytest.mark.parametrize("fn", [sphere(0.3, (0.02, -0.01, 0.03)), torus()])
def test_sparse_band_equals_dense(fn):
    r = 32
    dense = SparseFlex.from_sdf(dense_grid(r), r, fn)
    dense.deform = torch.randn_like(dense.deform) * 0.5  # deformation and weights must agree too
    ex_dense = dense.extract()
    # the band: every voxel with a sign change, dilated once (shuffled, to show order does not matter)
    inside = (dense.sdf < 0)[dense.voxel_corners]
    surface = dense.coords[inside.any(1) & ~inside.all(1)]
    coords = dilate(surface, 1, r)
    coords = coords[torch.randperm(len(coords))]
    sparse = SparseFlex.from_sdf(coords, r, fn)
    lookup = {tuple(c): i for i, c in enumerate(dense.corners.tolist())}
    sparse.deform = dense.deform[[lookup[tuple(c)] for c in sparse.corners.tolist()]]
    ex_sparse = sparse.extract()
    assert len(ex_sparse.faces) == len(ex_dense.faces)
    assert canonical_faces(ex_sparse) == canonical_faces(ex_dense)


def test_training_split_matches_surface_and_topology():
    fn = sphere(0.3)
    r = 32
    sf = SparseFlex.from_sdf(band(fn, r), r, fn)
    ex = sf.extract(training=True)
    check_closed(ex, chi=2)
    assert len(ex.faces) == 2 * len(sf.extract().faces)  # 4 triangles per quad instead of 2


def small_field(r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    sf = SparseFlex.from_sdf(dense_grid(r), r, lambda p: (p.double().norm(dim=1) - 0.27))
    sf.sdf = sf.sdf.double()
    # keep every value well away from zero so finite differences never flip a sign
    sf.sdf = torch.where(sf.sdf.abs() < 0.02, torch.sign(sf.sdf + 1e-12) * 0.02, sf.sdf)
    sf.deform = torch.randn(sf.deform.shape, generator=g, dtype=torch.double) * 0.3
    sf.alpha_raw = torch.randn(sf.alpha_raw.shape, generator=g, dtype=torch.double) * 0.3
    sf.beta_raw = torch.randn(sf.beta_raw.shape, generator=g, dtype=torch.double) * 0.3
    sf.gamma_raw = torch.randn(sf.gamma_raw.shape, generator=g, dtype=torch.double) * 0.3
    return sf


@pytest.mark.parametrize("name", ["sdf", "deform", "alpha_raw", "beta_raw", "gamma_raw"])
def test_gradcheck(name):
    sf = small_field()
    probe = torch.randn(4096, 3, dtype=torch.double)

    def f(x):
        setattr(sf, name, x)
        ex = sf.extract(training=True)
        v = ex.vertices
        return (v * probe[: len(v)]).sum() + ex.dev_loss

    x = getattr(sf, name).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_sdf_sign_loss_pushes_crossings_away():
    sf = small_field()
    sdf = sf.sdf.clone().requires_grad_(True)
    ex = extract_surface(sf.coords, sf.corner_positions().detach(), sdf, sf.voxel_corners)
    loss = sdf_sign_loss(sdf, ex.crossing_edges, scale=sf.resolution)
    loss.backward()
    ends = ex.crossing_edges
    # the gradient step moves each end of a crossing edge towards the other end's sign
    step = -sdf.grad[ends]
    other_sign = torch.sign(sdf.detach()[ends.flip(1)])
    assert (step * other_sign > 0).all()


def test_from_head_mean_and_consistency():
    coords = band(sphere(0.3), 16)
    head = torch.randn(len(coords), 53)
    sf = SparseFlex.from_head(coords, 16, head)
    # recompute one shared corner by brute force
    target = sf.voxel_corners[0, 3]
    vals = [head[v, 3] * 4 / 16 - 1 / 16 for v in range(len(coords)) for i in range(8)
            if sf.voxel_corners[v, i] == target and i == 3] + \
           [head[v, i] * 4 / 16 - 1 / 16 for v in range(len(coords)) for i in range(8)
            if sf.voxel_corners[v, i] == target and i != 3]
    assert sf.sdf[target] == pytest.approx(float(torch.stack(vals).mean()), abs=1e-6)
    assert sf.consistency > 0
    # identical per-corner predictions (from one global field) give zero consistency loss
    same = SparseFlex.from_head(coords, 16, torch.zeros(len(coords), 53))
    assert same.consistency == 0


def test_subdivide_keeps_linear_sdf_and_positions():
    r = 16
    fn = lambda p: p[:, 0] * 0.3 + p[:, 1] * 0.5 - p[:, 2] * 0.2 - 0.01  # noqa: E731
    sf = SparseFlex.from_sdf(band(fn, r), r, fn)
    sf.sdf = sf.sdf.double()
    fine = sf.subdivide()
    assert fine.resolution == 2 * r and fine.num_voxels == 8 * sf.num_voxels
    pos = fine.corners[:, 1:].double() / fine.resolution - 0.5
    assert torch.allclose(fine.sdf, fn(pos), atol=1e-6)  # source SDF was float32
    assert fine.corner_positions().sub(pos).abs().max() < 1e-6


def test_subdivide_keeps_deformed_corners_in_place():
    r = 16
    fn = sphere(0.3)
    sf = SparseFlex.from_sdf(band(fn, r), r, fn)
    # displacements up to 0.4 of a parent half-voxel stay inside the children's smaller range (half of it)
    noise = torch.rand(len(sf.corners), 3, generator=torch.Generator().manual_seed(0)) - 0.5
    disp = noise * 0.8 * max_displacement(r)
    sf.deform = deform_for(disp, r)
    assert torch.allclose(sf.displacement(), disp, atol=1e-6)
    fine = sf.subdivide()
    # a parent corner is the child corner at twice its index, and it must not move
    parent_key = {tuple(c): i for i, c in enumerate(sf.corners[:, 1:].tolist())}
    rows = [(parent_key[tuple(c // 2 for c in cc)], j) for j, cc in enumerate(fine.corners[:, 1:].tolist())
            if all(c % 2 == 0 for c in cc)]
    p_idx, c_idx = map(torch.tensor, zip(*rows))
    assert torch.allclose(fine.corner_positions()[c_idx], sf.corner_positions()[p_idx], atol=1e-5)


def test_select_is_a_subset():
    fn = sphere(0.3)
    r = 32
    sf = SparseFlex.from_sdf(band(fn, r), r, fn)
    part = sf.select(sf.voxel_centers()[:, 0] > 0)
    full, half = canonical_faces(sf.extract()), canonical_faces(part.extract())
    assert 0 < len(half) < len(full)
    assert set(half) <= set(full)
    assert len(boundary_edges(part.extract().faces)) > 0  # cut open where voxels were dropped


def test_keep_in_place_equals_select():
    """``keep_`` (in place, for dropping a few voxels of a huge band) gives what ``select`` gives, tensor by tensor."""
    g = torch.Generator().manual_seed(5)
    r = 12
    sf = SparseFlex.from_sdf(dense_grid(r), r, sphere(0.3))
    for name in ("deform", "alpha_raw", "beta_raw", "gamma_raw"):
        setattr(sf, name, torch.randn(getattr(sf, name).shape, generator=g))
    mask = torch.rand(sf.num_voxels, generator=g) < 0.7
    want = sf.select(mask)
    got = replace(sf).keep_(mask)
    for f in ("coords", "corners", "voxel_corners", "sdf", "deform", "alpha_raw", "beta_raw", "gamma_raw"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert len(got.corners) < len(sf.corners)  # corners no kept voxel uses are gone
    assert sf.num_voxels == len(mask)  # the original object is untouched; only `got` was edited


@pytest.mark.parametrize("training", [False, True])
def test_chunked_extraction_equals_one_chunk(training):
    """Crossings worked out chunk by chunk (1 surface voxel, 7, all) give the same mesh, L_dev, crossing edges and
    gradients, bit for bit: each dual vertex's sums happen inside its own chunk. An open band with random deformation
    and weights (saturated gamma ties included) exercises boundaries, both diagonals and unused dual vertices."""
    g = torch.Generator().manual_seed(3)
    r = 10
    coords = dense_grid(r)
    coords = coords[torch.rand(len(coords), generator=g) < 0.8]  # holes: open boundaries, dropped dual vertices
    sf = SparseFlex.from_sdf(coords, r, sphere(0.3))
    sf.deform = torch.randn(sf.deform.shape, generator=g)
    sf.alpha_raw = torch.randn(sf.alpha_raw.shape, generator=g)
    sf.beta_raw = torch.randn(sf.beta_raw.shape, generator=g)
    sf.gamma_raw = torch.where(torch.rand(sf.gamma_raw.shape, generator=g) < 0.5, 40.0,
                               torch.randn(sf.gamma_raw.shape, generator=g))
    results = []
    for chunk in (10 ** 9, 7, 1):
        params = [p.detach().clone().requires_grad_(training) for p in (sf.sdf, sf.deform, sf.alpha_raw,
                                                                         sf.beta_raw, sf.gamma_raw)]
        sub = SparseFlex(sf.coords, r, sf.corners, sf.voxel_corners, *params)
        ex = sub.extract(training=training, chunk=chunk)
        grads = []
        if training:
            (ex.vertices.square().sum() + ex.dev_loss).backward()
            grads = [p.grad for p in params]
        results.append((ex, grads))
    (ref, ref_grads), *others = results
    assert len(ref.faces) > 100 and len(boundary_edges(ref.faces)) > 0
    assert len(ref.vertices) < ref.num_dual + (len(ref.faces) // 4 if training else 0)  # some dual vertex unused
    for ex, grads in others:
        for name in ("vertices", "faces", "vertex_batch", "dev", "dual_voxel", "crossing_edges"):
            assert torch.equal(getattr(ex, name), getattr(ref, name)), name
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # shared corners sum chunk by chunk

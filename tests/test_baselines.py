"""Baselines of the fit benchmark: watertight UDF shell, marching cubes on the exact SDF, dense FlexiCubes fit."""

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from sparseflex.data.mesh import Mesh
from sparseflex.data.sampling import sample_surface
from sparseflex.errors import OptionError
from sparseflex.eval.metrics import mesh_metrics
from sparseflex.eval.topology import boundary_edges, signed_volume
from sparseflex.fit.baselines import (dense_flexicubes_fit, dense_peak_bytes, dense_sparseflex, exact_sdf_mc,
                                      inside_parity, largest_dense_resolution, watertight_udf)
from sparseflex.fit.fitter import FitConfig


def sphere(radius=0.4, subdivisions=4, center=(0.0, 0.0, 0.0)) -> Mesh:
    tm = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return Mesh.from_trimesh(tm.apply_translation(center))


def disc(radius=0.45, z=0.03, n=64) -> Mesh:
    """A flat open disc (one layer, a boundary loop), off the grid planes."""
    t = np.linspace(0, 2 * np.pi, n + 1)[:-1]
    rim = np.stack([radius * np.cos(t), radius * np.sin(t), np.full(n, z)], 1)
    v = np.concatenate([[[0.0, 0.0, z]], rim])
    f = np.stack([np.zeros(n, int), np.arange(1, n + 1), np.roll(np.arange(1, n + 1), -1)], 1)
    return Mesh(torch.tensor(v, dtype=torch.float32), torch.tensor(f))


def test_udf_shell_of_open_disc_is_closed_double_layer():
    r = 32
    gt = disc()
    shell = watertight_udf(gt, r)
    assert shell.num_faces > 0 and len(boundary_edges(shell.faces)) == 0  # closed, though the input is open
    # the two layers sit 1/R above and below the sheet, rounded over its rim
    z = shell.vertices[:, 2] - 0.03
    inner = shell.vertices[:, :2].norm(dim=1) < 0.45 - 2 / r
    assert torch.allclose(z[inner].abs(), torch.full_like(z[inner], 1 / r), atol=0.05 / r)
    # F-score-like counts: shell samples near the disc (exact distance to the planar disc), disc samples near the
    # shell (distance to the nearest dense shell sample, an upper bound): a quarter voxel fails, two voxels pass
    gen = torch.Generator().manual_seed(0)
    pts, _, _ = sample_surface(shell, 20_000, generator=gen)
    lateral = (pts[:, :2].norm(dim=1) - 0.45).clamp(min=0)
    to_disc = torch.sqrt((pts[:, 2] - 0.03) ** 2 + lateral ** 2)
    assert (to_disc <= 0.25 / r).float().mean() < 0.05
    assert (to_disc <= 2 / r).all()
    dense, _, _ = sample_surface(shell, 400_000, generator=gen)
    to_shell, _ = cKDTree(dense.numpy()).query(sample_surface(gt, 5_000, generator=gen)[0].numpy())
    assert (to_shell <= 2 / r).all()
    assert (to_shell <= 0.25 / r).mean() < 0.05


def test_exact_sdf_mc_matches_sphere_radius():
    r, radius = 32, 0.37
    out = exact_sdf_mc(sphere(radius, center=(0.013, -0.021, 0.007)), r)
    assert len(boundary_edges(out.faces)) == 0
    dist = (out.vertices - torch.tensor([0.013, -0.021, 0.007])).norm(dim=1)
    assert (dist - radius).abs().max() < 0.1 / r  # linear interpolation of an exact SDF: a small fraction of a voxel
    assert signed_volume(out.vertices, out.faces) == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.02)  # outward


def test_inside_parity_of_nested_shells_alternates():
    r = 16
    shells = [sphere(rad, subdivisions=3) for rad in (0.45, 0.3, 0.15)]
    faces, verts, off = [], [], 0
    for s in shells:
        verts.append(s.vertices)
        faces.append(s.faces + off)
        off += s.num_vertices
    inside = inside_parity(Mesh(torch.cat(verts), torch.cat(faces)), r)
    n = inside.shape[0]
    pos = (np.arange(n) - (n - r - 1) // 2) / r - 0.5
    radius = np.sqrt(pos[:, None, None] ** 2 + pos[None, :, None] ** 2 + pos[None, None, :] ** 2)
    expected = (radius < 0.45) ^ (radius < 0.3) ^ (radius < 0.15)
    clear = np.abs(radius[..., None] - np.array([0.45, 0.3, 0.15])).min(-1) > 0.01  # away from the facets
    assert (inside[clear] == expected[clear]).all()


def test_exact_sdf_mc_rejects_open_mesh():
    with pytest.raises(OptionError, match="watertight"):
        exact_sdf_mc(disc(), 16)


def test_dense_sparseflex_covers_the_grid_with_consistent_signs():
    r = 16
    sf = dense_sparseflex(sphere(0.3, subdivisions=3), r)
    assert sf.num_voxels == (r + 2) ** 3  # every voxel of the grid plus the band's one-voxel border
    pos = sf.corners[:, 1:].float() / r - 0.5
    far = (pos.norm(dim=1) - 0.3).abs() > 3 / r
    assert ((sf.sdf[far] < 0) == (pos[far].norm(dim=1) < 0.3)).all()


def test_dense_flexicubes_fit_on_sphere():
    gt = sphere(0.35, subdivisions=3)
    out = dense_flexicubes_fit(gt, 16, iterations=20, config=FitConfig(image_size=64))
    assert len(boundary_edges(out.faces)) == 0
    assert mesh_metrics(out, gt, num_points=20_000, ceiling=False)["fscore@0.01"] >= 95


def test_largest_dense_resolution_respects_the_budget():
    r = largest_dense_resolution(8e9)
    assert dense_peak_bytes(r) <= 8e9 < dense_peak_bytes(2 * r)
    assert largest_dense_resolution(1e12, max_resolution=256) == 256
    with pytest.raises(OptionError, match="budget"):
        largest_dense_resolution(1e6)

"""mesh_metrics against closed-form values: identical meshes, a cube and a sphere scaled by a known amount."""

import math

import numpy as np
import pytest
import torch
import trimesh

from sparseflex.data.mesh import Mesh
from sparseflex.eval.metrics import SurfaceDistance, mesh_metrics

N = 100_000


def box(half: float) -> Mesh:
    return Mesh.from_trimesh(trimesh.creation.box(extents=(2 * half,) * 3))


def test_identical_meshes():
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=3))
    m = mesh_metrics(mesh, mesh, num_points=N // 2)
    assert m["chamfer"] < 1e-8 and m["chamfer_l1"] < 1e-3
    for t in ("0.001", "0.01"):
        assert m[f"fscore@{t}"] == 100.0 and m[f"precision@{t}"] == 100.0 and m[f"recall@{t}"] == 100.0
    assert m["normal_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert m["ceiling"]["fscore@0.001"] >= 99 and m["ceiling"]["chamfer"] < 1e-8


def test_cube_scaled_by_known_amount():
    """Ground truth: the cube [-1/2, 1/2]^3; prediction: [-a, a]^3 with a = 1/2 + e (the ground truth is already
    normalised, so the protocol's transform is the identity).

    - every ground-truth point lies at distance exactly e from the bigger cube (inside it, e from the nearest face);
    - a prediction point (a, y, z) lies at sqrt(e^2 + u^2 + v^2) from the small cube, u = max(|y| - 1/2, 0),
      v = max(|z| - 1/2, 0); u is 0 with probability 1 - e/a, else uniform on (0, e] with density 1/a. Hence
      mean d_p^2 = e^2 + 2 e^3 / (3 a) and P(d_p > t) = 2 (1 - e/a)(e - r)/a + (e^2 - pi r^2 / 4) / a^2 with
      r = sqrt(t^2 - e^2), for e < t < e sqrt(2).
    """
    e, t_hi, t_lo = 0.01, 0.012, 0.009
    a = 0.5 + e
    n = 30_000  # ties along the cube's edges make queries slow: keep the sample small
    m = mesh_metrics(box(a), box(0.5), num_points=n, thresholds=(t_lo, t_hi), ceiling=False)
    chamfer = (e ** 2 + (e ** 2 + 2 * e ** 3 / (3 * a))) / 2 * 1e4
    assert m["chamfer"] == pytest.approx(chamfer, rel=2e-3)
    r = math.sqrt(t_hi ** 2 - e ** 2)
    precision = 100 * (1 - (2 * (1 - e / a) * (e - r) / a + (e ** 2 - math.pi * r ** 2 / 4) / a ** 2))
    sigma = 100 * math.sqrt(precision / 100 * (1 - precision / 100) / n)
    assert m[f"recall@{t_hi:g}"] == 100.0
    assert m[f"precision@{t_hi:g}"] == pytest.approx(precision, abs=4 * sigma)
    assert m[f"fscore@{t_hi:g}"] == pytest.approx(2 * precision * 100 / (precision + 100), abs=4 * sigma)
    assert m[f"fscore@{t_lo:g}"] == 0.0 and m[f"recall@{t_lo:g}"] == 0.0  # every d_g = e > t_lo
    # parallel faces everywhere, except that a point in an edge strip (fraction 1 - (1 - e/a)^2) is closest to an
    # edge of the small cube, where either adjacent face may be reported
    strip = 1 - (1 - e / a) ** 2
    assert 1 - strip / 2 - 4 * math.sqrt(strip / n) <= m["normal_consistency"] < 1


def test_sphere_scaled_by_known_amount():
    """A convex polyhedron P scaled by (1 + d) about the centre c: a point on face f of P lies d h_f from the
    scaled face (h_f: distance of f's plane from c) and at least d h_min from the scaled surface; a point
    (1 + d) x on the scaled copy lies at most |d x| <= d rho_max from P, and at least d h_f. So every distance is
    within [d h_min, d rho_max], which for a fine icosphere is d times the radius up to 0.3 %."""
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    gt = Mesh.from_trimesh(sphere)
    d = 0.004
    centre = (gt.vertices.amin(0) + gt.vertices.amax(0)) / 2
    pred = Mesh((gt.vertices - centre) * (1 + d) + centre, gt.faces)
    # the protocol normalises both by the ground truth's box: distances scale by 1 / extent
    scale = 1 / float((gt.vertices.amax(0) - gt.vertices.amin(0)).max())
    tri = (gt.vertices.double() - centre.double())[gt.faces]
    normal = torch.nn.functional.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=1)
    h_min = float((normal * tri[:, 0]).sum(1).abs().min()) * scale
    rho_max = float((gt.vertices.double() - centre.double()).norm(dim=1).max()) * scale
    lo, hi = d * h_min, d * rho_max
    assert hi / lo < 1.01
    m = mesh_metrics(pred, gt, num_points=N, thresholds=(lo * 0.999, hi * 1.001), ceiling=False)
    assert lo ** 2 * 1e4 * 0.999 <= m["chamfer"] <= hi ** 2 * 1e4 * 1.001
    assert lo * 1e4 * 0.999 <= m["chamfer_l1"] <= hi * 1e4 * 1.001
    assert m[f"fscore@{hi * 1.001:g}"] == 100.0
    assert m[f"fscore@{lo * 0.999:g}"] == 0.0


def test_surface_distance_is_exact():
    """Point-to-triangle distances against trimesh's closest points (random points inside and outside; trimesh is
    slow, so few)."""
    mesh = trimesh.creation.icosphere(subdivisions=2)
    gen = np.random.default_rng(0)
    pts = gen.normal(size=(500, 3)) * gen.uniform(0.2, 2.0, (500, 1))
    dist, _ = SurfaceDistance(mesh.vertices, mesh.faces).query(pts)
    _, brute, _ = trimesh.proximity.closest_point(mesh, pts)
    assert np.allclose(dist, brute, atol=1e-9)


def test_empty_prediction_scores_zero():
    gt = box(0.5)
    m = mesh_metrics(Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)), gt, num_points=1000,
                     ceiling=False)
    assert m["fscore@0.01"] == 0.0 and m["chamfer"] is None and "ceiling" not in m

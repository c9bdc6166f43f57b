"""Differentiable maps: analytic depth/normal/barycentrics, topology, exact anti-aliased coverage, finite-difference
gradients, silhouette optimisation, interior views."""

import math

import numpy as np
import pytest
import torch
import trimesh

from sparseflex.losses import RenderLossWeights, render_loss
from sparseflex.render import (Camera, barycentrics, interior_views, interpolate, intrinsics, look_at,
                               mesh_topology, rasterize, render, sphere_views)
from sparseflex.render.maps import silhouette_edges, surface_maps


def _front_camera(size=32, fov=60.0, dtype=torch.float64, near=0.1, far=10.0):
    """Identity extrinsics: world = camera space (x right, y down, z forward)."""
    return Camera(intrinsics(fov, size, size, dtype=dtype), torch.eye(4, dtype=dtype), size, size, near, far)


def test_plane_depth_normal_and_both_sides(device):
    cam = _front_camera().to(device)
    # A tilted plane z = 1 + 0.3 x, wound both ways.
    v = torch.tensor([[-3, -3, 0.1], [3, -3, 1.9], [3, 3, 1.9], [-3, 3, 0.1]], dtype=torch.float64, device=device)
    for f in (torch.tensor([[0, 1, 2], [0, 2, 3]]), torch.tensor([[0, 2, 1], [0, 3, 2]])):
        out = render(v, f.to(device), cam, antialias_edges=False)
        assert {t.device.type for t in out.values()} == {device.type}
        out = {k: t.cpu() for k, t in out.items()}
        d = cam.to("cpu").pixel_directions()[0]
        z = 1.0 / (1 - 0.3 * d[..., 0])                      # ray t * d meets z = 1 + 0.3 x
        assert out["mask"].all()
        assert torch.allclose(out["depth"][0], z, atol=1e-12)
        n = torch.tensor([-0.3, 0.0, 1.0], dtype=torch.float64)
        n = -n / n.norm()                                     # facing the camera, whatever the winding
        assert torch.allclose(out["normal"][0], n.expand(32, 32, 3), atol=1e-12)


def test_barycentrics_are_perspective_correct():
    mesh = trimesh.creation.icosphere(2, radius=0.4)
    v, f = torch.tensor(mesh.vertices), torch.tensor(mesh.faces)
    cam = sphere_views(3, size=24, dtype=torch.float64)
    ids = rasterize(v, f, cam, backend="torch")
    bary = barycentrics(v, f, ids, cam)
    hit = ids >= 0
    assert torch.allclose(bary.sum(-1)[hit], torch.ones(int(hit.sum()), dtype=torch.float64))
    assert (bary[hit] > -1e-9).all()
    # Interpolated world positions are exactly the ray hits: centre + depth * (world ray with z = 1).
    pos = interpolate(v, f, ids, bary)
    depth = surface_maps(v, f, ids, cam)["depth"]
    rays = torch.einsum("bji,bhwj->bhwi", cam.rotation, cam.pixel_directions())
    expected = cam.centers()[:, None, None] + depth[..., None] * rays
    assert torch.allclose(pos[hit], expected[hit], atol=1e-12)
    # Per-view attributes: interpolating camera-space positions gives back the depth map as z.
    cam_pos = interpolate(cam.world_to_camera(v), f, ids, bary)
    assert torch.allclose(cam_pos[..., 2][hit], depth[hit], atol=1e-12)


def _brute_force_neighbours(faces):
    nb, flip = [], []
    for fi, face in enumerate(faces.tolist()):
        row_nb, row_flip = [], []
        for k in range(3):
            a, b = face[(k + 1) % 3], face[(k + 2) % 3]
            others = [(g, (a, b) in [(h[(m + 1) % 3], h[(m + 2) % 3]) for m in range(3)])
                      for g, h in enumerate(faces.tolist()) if g != fi and a in h and b in h]
            row_nb.append(others[0][0] if len(others) == 1 else (-1 if not others else -2))
            row_flip.append(len(others) == 1 and others[0][1])
        nb.append(row_nb)
        flip.append(row_flip)
    return torch.tensor(nb), torch.tensor(flip)


def test_topology_matches_brute_force():
    hemi = trimesh.creation.icosphere(1)
    keep = hemi.triangles_center[:, 2] > 0
    faces = torch.tensor(hemi.faces[keep])
    faces[3] = faces[3].flip(0)                                          # one inconsistently wound face
    # A third face on edge 0 of face 0 makes that edge non-manifold.
    extra = torch.tensor([[int(faces[0, 1]), int(faces[0, 2]), int(faces.max()) + 1]])
    faces = torch.cat([faces, extra])
    topo = mesh_topology(faces)
    nb, flip = _brute_force_neighbours(faces)
    assert torch.equal(topo.neighbor, nb)
    assert torch.equal(topo.flipped, flip)
    assert (nb == -1).any() and (nb == -2).any() and flip.any()


def _edge_scene(x_edge: float, y_top: float = 4.3):
    """A square whose right edge is the vertical line u = x_edge in pixel units, at depth 1 in front of a camera
    with focal 16 and principal point 15.5 (so u = 16 x + 15.5)."""
    cam = _front_camera(size=32, fov=2 * math.degrees(math.atan(1.0)))
    x = (x_edge - 15.5) / 16.0
    v = torch.tensor([[-3.0, (y_top - 15.5) / 16, 1.0], [x, (y_top - 15.5) / 16, 1.0], [x, 3.0, 1.0],
                      [-3.0, 3.0, 1.0]], dtype=torch.float64, requires_grad=True)
    return v, torch.tensor([[0, 1, 2], [0, 2, 3]]), cam


@pytest.mark.parametrize("x_edge", [10.13, 10.5, 10.87, 20.3])
def test_antialiased_coverage_is_exact_along_an_edge(x_edge):
    v, f, cam = _edge_scene(x_edge)
    out = render(v, f, cam)
    # Rows well inside the square: the covered length of each row is x_edge + 1/2 (cells span j +- 1/2).
    rows = out["mask"][0, 10:30]
    assert torch.allclose(rows.sum(1), torch.full((20,), x_edge + 0.5, dtype=torch.float64), atol=1e-9)
    # and moving the edge by du pixels moves each row's coverage by du: d(sum of 20 rows)/dx = 20 * 16 (u = 16 x + c).
    rows.sum().backward()
    assert v.grad[1:3, 0].sum().item() == pytest.approx(20 * 16.0, rel=1e-9)


def test_no_antialiasing_across_interior_edges():
    mesh = trimesh.creation.icosphere(3, radius=0.4)
    v, f = torch.tensor(mesh.vertices), torch.tensor(mesh.faces)
    cam = sphere_views(1, size=48, dtype=torch.float64)
    plain = render(v, f, cam, antialias_edges=False)
    aa = render(v, f, cam)
    changed = (aa["mask"] != plain["mask"])[0]
    # Only pixels next to the silhouette change: their 3x3 neighbourhood straddles the mask boundary.
    m = plain["mask"][0]
    pad = torch.nn.functional.pad(m[None, None], (1, 1, 1, 1))
    near_edge = (torch.nn.functional.max_pool2d(pad, 3, 1) != -torch.nn.functional.max_pool2d(-pad, 3, 1))[0, 0]
    assert changed.any() and not (changed & ~near_edge).any()
    # A closed sphere seen from outside: silhouette edges separate front- from back-facing faces only.
    sil = silhouette_edges(v, f, cam, mesh_topology(f))
    assert sil.any() and sil.float().mean() < 0.2


def _loss_setup():
    torch.manual_seed(1)
    mesh = trimesh.creation.icosphere(2, radius=0.35)
    v0 = torch.tensor(mesh.vertices) * (1 + 0.05 * torch.rand(len(mesh.vertices), 1, dtype=torch.float64))
    f = torch.tensor(mesh.faces)
    cam = sphere_views(2, radius=1.6, fov=35.0, size=40, dtype=torch.float64)
    with torch.no_grad():  # a different shape (not a similarity: its normals would equal ours, L1 at its kink)
        target = render(v0 * 1.04 + 0.01 * torch.randn(v0.shape, dtype=torch.float64), f, cam)
    weights = RenderLossWeights(mask=1.0, depth=1.0, normal=1.0, ssim=0.0)
    def loss(v, antialias_edges=True):
        return render_loss(render(v, f, cam, backend="torch", antialias_edges=antialias_edges), target, weights)[0]
    return v0, f, cam, loss


def test_finite_differences_match_autograd_interior_and_silhouette():
    v0, f, cam, loss = _loss_setup()
    v = v0.clone().requires_grad_(True)
    loss(v).backward()
    grad = v.grad
    v_plain = v0.clone().requires_grad_(True)
    loss(v_plain, antialias_edges=False).backward()
    aa_share = (grad - v_plain.grad).abs().amax(1) / grad.abs().amax(1).clamp(min=1e-12)
    ids = rasterize(v0, f, cam, backend="torch")
    seen = torch.zeros(len(v0), dtype=torch.bool)
    seen[f[ids[ids >= 0]].reshape(-1)] = True
    sil = silhouette_edges(v0, f, cam, mesh_topology(f)).any(0)         # [F, 3] in either view
    on_sil = torch.zeros(len(v0), dtype=torch.bool)
    a, b = f[:, [1, 2, 0]][sil], f[:, [2, 0, 1]][sil]
    on_sil[a] = on_sil[b] = True
    checked = {"interior": 0, "silhouette": 0}
    for kind, pool in (("interior", seen & ~on_sil), ("silhouette", on_sil)):
        idx = pool.nonzero().squeeze(1)
        g = grad[idx].abs().amax(1)
        for vi in idx[g.argsort(descending=True)[:6]].tolist():
            c = int(grad[vi].abs().argmax())
            h = 1e-7
            plus, minus = v0.clone(), v0.clone()
            plus[vi, c] += h
            minus[vi, c] -= h
            # Visibility must not change within the step, or the difference is not a derivative.
            assert torch.equal(rasterize(plus, f, cam, backend="torch"), ids)
            assert torch.equal(rasterize(minus, f, cam, backend="torch"), ids)
            with torch.no_grad():
                fd = (loss(plus) - loss(minus)).item() / (2 * h)
            assert fd == pytest.approx(grad[vi, c].item(), rel=0.05), (kind, vi, c)
            checked[kind] += 1
            if kind == "silhouette":  # these gradients come largely from the anti-aliasing step
                assert aa_share[vi] > 0.2
    assert checked == {"interior": 6, "silhouette": 6}


def test_silhouette_optimisation_recovers_translation_and_scale(shared_meshes):
    mesh = trimesh.load(shared_meshes / "closed" / "ajc_spot.obj", force="mesh")
    mesh.apply_translation(-mesh.bounds.mean(0))
    mesh.apply_scale(0.6 / mesh.extents.max())
    v, f = torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)
    size, fov, radius = 96, 40.0, 2.0
    cam = Camera(torch.stack([intrinsics(fov, size, size)] * 3),
                 look_at(torch.tensor([[0.0, 0.0, radius], [radius, 0.0, 0.0], [0.0, radius, 0.001]]),
                         torch.zeros(3, 3)), size, size, 1.0, 3.0)
    t_true, s_true = torch.tensor([0.06, -0.04, 0.05]), 1.12
    with torch.no_grad():
        target = render(v * s_true + t_true, f, cam)["mask"]
    t = torch.zeros(3, requires_grad=True)
    log_s = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([t, log_s], lr=0.01)
    for step in range(150):
        opt.zero_grad()
        loss = (render(v * log_s.exp() + t, f, cam)["mask"] - target).abs().mean()
        loss.backward()
        opt.step()
        if step == 100:
            for group in opt.param_groups:
                group["lr"] = 0.002
    px_per_unit = 0.5 * size / math.tan(math.radians(fov) / 2) / radius   # at the object's distance
    extent = float(np.linalg.norm(mesh.extents)) / 2
    t_err_px = (t.detach() - t_true).abs().max().item() * px_per_unit
    s_err_px = abs(log_s.exp().item() - s_true) * extent * px_per_unit
    assert t_err_px < 0.01 * size and s_err_px < 0.01 * size, (t_err_px, s_err_px)


def _ray_sphere(origin, dirs, radius):
    """Distances along unit ``dirs`` from ``origin`` (inside or outside) to a centred sphere, nearest positive."""
    b = (dirs * origin).sum(-1)
    c = (origin * origin).sum() - radius ** 2
    disc = b * b - c
    root = torch.sqrt(disc.clamp(min=0))
    t0, t1 = -b - root, -b + root
    t = torch.where(t0 > 0, t0, t1)
    return torch.where((disc >= 0) & (t > 0), t, torch.full_like(t, float("inf")))


def test_interior_camera_between_nested_spheres_sees_the_inner_one():
    outer = trimesh.creation.icosphere(4, radius=0.45)
    inner = trimesh.creation.icosphere(4, radius=0.2)
    both = trimesh.util.concatenate([outer, inner])
    v, f = torch.tensor(both.vertices), torch.tensor(both.faces)
    eye = torch.tensor([[0.32, 0.0, 0.0]], dtype=torch.float64)
    cam = Camera(intrinsics(90.0, 40, 40, dtype=torch.float64), look_at(eye, torch.zeros(1, 3, dtype=torch.float64)),
                 40, 40, 0.01, 2.0)
    out = render(v, f, cam, antialias_edges=False)
    d = cam.pixel_directions()[0]
    rays = torch.einsum("ji,hwj->hwi", cam.rotation[0], d)
    unit = rays / rays.norm(dim=-1, keepdim=True)
    t = torch.minimum(_ray_sphere(eye[0], unit, 0.2), _ray_sphere(eye[0], unit, 0.45))
    z = t / d.norm(dim=-1)                                                   # camera z of the hit
    assert out["mask"].all()
    inner_hit = _ray_sphere(eye[0], unit, 0.2) < 1
    assert inner_hit[20, 20] and inner_hit.float().mean() > 0.2 and (~inner_hit).any()
    assert (out["depth"][0] - z).abs().max() < 2e-3
    assert (out["depth"][0, 20, 20] - 0.12).abs() < 2e-3                       # 0.32 - 0.2 straight ahead


def test_interior_views_of_real_nested_spheres(shared_meshes):
    mesh = trimesh.load(shared_meshes / "interior" / "om_head3_nested_spheres.ply", force="mesh")
    mesh.apply_translation(-mesh.bounds.mean(0))
    mesh.apply_scale(1.0 / mesh.extents.max())
    v, f = torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)
    cam = interior_views(torch.zeros(1, 3), 3, torch.Generator().manual_seed(0), size=24)
    out = render(v, f, cam, antialias_edges=False)
    assert out["mask"].all()
    dist = out["depth"] * cam.pixel_directions().norm(dim=-1)                 # distance from the centre
    assert (dist - 0.435).abs().max() < 0.01                                   # innermost shell, r = 0.87 / 2

"""Cameras: OpenCV projection, clip matrices, look-at, camera sets, validation."""

import math

import pytest
import torch

from sparseflex.errors import OptionError
from sparseflex.render import (Camera, cat_cameras, fibonacci_sphere, interior_views, intrinsics, look_at,
                               random_views, sphere_views, zoom_views)


def _pixels(camera, points):
    """OpenCV projection u = fx x/z + s y/z + cx, v = fy y/z + cy, written out by hand."""
    cam = camera.world_to_camera(points)
    K = camera.K[:, None]
    x, y, z = cam.unbind(-1)
    return (K[..., 0, 0] * x + K[..., 0, 1] * y) / z + K[..., 0, 2], K[..., 1, 1] * y / z + K[..., 1, 2], z


def test_projection_matches_opencv_pixels_and_planes():
    K = torch.tensor([[90.0, 2.0, 30.5], [0.0, 80.0, 20.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    E = look_at(torch.tensor([[0.3, -1.5, 1.2]], dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
    cam = Camera(K, E, width=64, height=48, near=0.7, far=3.1)
    pts = torch.randn(200, 3, dtype=torch.float64) * 0.4
    u, v, z = _pixels(cam, pts)
    clip = torch.einsum("bij,nj->bni", cam.mvp(), torch.cat([pts, torch.ones(200, 1, dtype=pts.dtype)], 1))
    ndc = clip[..., :3] / clip[..., 3:]
    # Pixel centres at integer (u, v); the image spans [-0.5, W - 0.5] -> NDC [-1, 1].
    assert torch.allclose(ndc[..., 0], (2 * u + 1) / 64 - 1, atol=1e-10)
    assert torch.allclose(ndc[..., 1], (2 * v + 1) / 48 - 1, atol=1e-10)
    assert torch.allclose(clip[..., 3], z)
    # z in NDC is -1 on the near plane and +1 on the far plane.
    on_planes = torch.tensor([[0.0, 0.0, 0.7, 1.0], [0.1, 0.2, 3.1, 1.0]], dtype=torch.float64)
    zc = on_planes @ cam.projection()[0].T
    assert torch.allclose(zc[:, 2] / zc[:, 3], torch.tensor([-1.0, 1.0], dtype=torch.float64))


def test_look_at_centres_orientation_and_pixel_rays():
    eyes = torch.tensor([[0.0, 0.0, 2.0], [1.0, 1.0, 1.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.2], [0.0, 0.0, 0.0]], dtype=torch.float64)
    K = intrinsics(50.0, 33, 21, dtype=torch.float64)
    cam = Camera(K, look_at(eyes, targets), 33, 21, 0.1, 5.0)
    assert torch.allclose(cam.centers(), eyes)
    u, v, z = _pixels(cam, targets[:, None])
    assert torch.allclose(u[:, 0], torch.full((3,), 16.0, dtype=torch.float64))
    assert torch.allclose(v[:, 0], torch.full((3,), 10.0, dtype=torch.float64))
    assert (z > 0).all()
    # World up (+y) appears towards the top of the image (smaller v) for the first two cameras.
    _, v_up, _ = _pixels(cam, (targets + torch.tensor([0.0, 0.1, 0.0], dtype=torch.float64))[:, None])
    assert (v_up[:2, 0] < 10.0).all()
    # The ray through a pixel centre passes through the points projecting there.
    d = cam.pixel_directions()
    assert torch.allclose(d[:, 10, 16], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(3, 3), atol=1e-12)


def test_fibonacci_sphere_spreads_evenly():
    n = 200
    d = fibonacci_sphere(n, torch.float64)
    assert torch.allclose(d.norm(dim=1), torch.ones(n, dtype=torch.float64))
    assert d.mean(0).norm() < 0.02
    nearest = (torch.cdist(d, d) + 10 * torch.eye(n)).min(1).values
    spacing = math.sqrt(4 * math.pi / n)  # side of the area per point
    assert nearest.min() > 0.6 * spacing and nearest.max() < 1.5 * spacing


def test_camera_sets_geometry():
    g = torch.Generator().manual_seed(0)
    sv = sphere_views(6, radius=2.5, fov=30.0, size=(40, 30))
    assert (sv.width, sv.height) == (40, 30) and len(sv) == 6
    assert torch.allclose(sv.centers().norm(dim=1), torch.full((6,), 2.5), atol=1e-5)
    u, v, _ = _pixels(sv, torch.zeros(1, 3))
    assert torch.allclose(u, torch.full_like(u, 19.5), atol=1e-3)
    assert torch.allclose(v, torch.full_like(v, 14.5), atol=1e-3)
    corners = torch.tensor([[x, y, z] for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)])
    zc = sv.world_to_camera(corners)[..., 2]
    assert (zc > sv.near[:, None]).all() and (zc < sv.far[:, None]).all()

    rv = random_views(5, g, size=16)
    dist = rv.centers().norm(dim=1)
    assert ((dist > 1.5) & (dist < 2.6)).all()

    pts = torch.rand(50, 3) - 0.5
    normals = torch.nn.functional.normalize(torch.randn(50, 3), dim=1)
    zv = zoom_views(pts, 8, g, normals=normals, size=16)
    # Each zoom camera looks straight at one surface point from its outer side, from close by.
    u, v, z = _pixels(zv, pts)
    at_centre = ((u - 7.5).abs() < 1e-3) & ((v - 7.5).abs() < 1e-3) & (z > 0)
    assert at_centre.any(1).all()
    aimed = at_centre.float().argmax(1)
    offset = zv.centers() - pts[aimed]
    assert ((offset * normals[aimed]).sum(1) > 0).all()
    assert ((offset.norm(dim=1) >= 0.25 - 1e-5) & (offset.norm(dim=1) <= 0.5 + 1e-5)).all()

    iv = interior_views(pts, 8, g, normals=normals, offset=0.05, size=16)
    behind = pts[:, None] - 0.05 * normals[:, None]  # [50, 1, 3]
    dist = (iv.centers()[None] - behind).norm(dim=-1).min(0).values
    assert (dist < 1e-5).all()
    assert (iv.near < 0.01).all()

    both = cat_cameras([sv[:2], sv[3]])
    assert len(both) == 3 and torch.equal(both.K[2], sv.K[3])
    assert both.to(dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("make, message", [
    (lambda: Camera(torch.diag(torch.tensor([0.0, 10.0, 1.0])), torch.eye(4), 8, 8, 0.1, 1.0), "degenerate intrinsics"),
    (lambda: Camera(intrinsics(40, 8, 8), torch.eye(4), 8, 8, 1.0, 1.0), "near must be smaller than far"),
    (lambda: Camera(intrinsics(40, 8, 8), torch.eye(4), 8, 8, 2.0, 1.0), "near must be smaller than far"),
    (lambda: Camera(intrinsics(40, 8, 8), torch.eye(4), 8, 8, 0.0, 1.0), "near planes must be positive"),
    (lambda: Camera(intrinsics(40, 8, 8), torch.eye(4), 0, 8, 0.1, 1.0), "image size must be positive"),
    (lambda: Camera(intrinsics(40, 8, 8), torch.eye(4) * 2, 8, 8, 0.1, 1.0), "degenerate extrinsics"),
    (lambda: Camera(intrinsics(40, 8, 8), torch.full((4, 4), float("nan")), 8, 8, 0.1, 1.0), "NaN"),
    (lambda: intrinsics(40, 0, 8), "image size must be positive"),
    (lambda: intrinsics(180, 8, 8), "field of view"),
    (lambda: sphere_views(0), "number of views"),
    (lambda: look_at(torch.zeros(1, 3), torch.zeros(1, 3)), "sits exactly on its target"),
])
def test_bad_cameras_raise_one_line_errors(make, message):
    with pytest.raises(OptionError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_to_pixels_inverts_pixel_directions():
    """A point along the ray through pixel (u, v) at depth z projects back to (u, v) with depth z."""
    from sparseflex.render import random_views
    cam = random_views(2, torch.Generator().manual_seed(3), size=32).to(dtype=torch.float64)
    dirs = cam.pixel_directions()                                   # [B, H, W, 3], camera space, z = 1
    z = 1.7
    pts_cam = dirs[:, 5, 9] * z                                     # pixel u = 9, v = 5
    R, t = cam.rotation, cam.translation
    world = ((pts_cam - t)[:, None, :] @ R)[:, 0]                  # camera -> world: R^T (x - t)
    for b in range(len(cam)):
        uv, depth = cam[b].to_pixels(world[b:b + 1])
        torch.testing.assert_close(uv[0, 0], torch.tensor([9.0, 5.0], dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(depth[0, 0], torch.tensor(z, dtype=torch.float64), atol=1e-5, rtol=0)

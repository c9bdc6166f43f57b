"""Visibility: the torch and Embree paths agree with each other and with trimesh's own ray casting, clip at near/far,
handle triangles behind the camera, and reject bad input."""

import numpy as np
import pytest
import torch
import trimesh
from trimesh.ray.ray_triangle import RayMeshIntersector

from sparseflex.errors import InputError, OptionError
from sparseflex.render import (Camera, cat_cameras, embree_available, interior_views, intrinsics,
                               rasterize, render, sphere_views)
from sparseflex.render.maps import surface_maps

needs_embree = pytest.mark.skipif(not embree_available(), reason="embreex not installed")


def normalised(path):
    mesh = trimesh.load(path, force="mesh")
    mesh.apply_translation(-mesh.bounds.mean(0))
    mesh.apply_scale(1.0 / mesh.extents.max())
    return mesh


def reference_depth(mesh: trimesh.Trimesh, camera: Camera) -> np.ndarray:
    """Camera z of the nearest hit with z in [near, far] per pixel (inf for none), by trimesh's pure-numpy ray
    triangle intersector, rays from the camera centre through pixel centres."""
    cam = camera.to(dtype=torch.float64)
    d_cam = cam.pixel_directions()                                                    # [B, H, W, 3], z = 1
    d_world = torch.einsum("bji,bhwj->bhwi", cam.rotation, d_cam).numpy()
    out = np.full(d_cam.shape[:3], np.inf)
    caster = RayMeshIntersector(mesh)
    for b in range(len(cam)):
        dirs = d_world[b].reshape(-1, 3)
        origins = np.repeat(cam.centers()[b].numpy()[None], len(dirs), 0)
        loc, ray, _ = caster.intersects_location(origins, dirs, multiple_hits=True)
        z = (cam.world_to_camera(torch.from_numpy(loc))[b, :, 2]).numpy()
        ok = (z >= cam.near[b].item()) & (z <= cam.far[b].item())
        flat = np.full(len(dirs), np.inf)
        np.minimum.at(flat, ray[ok], z[ok])
        out[b] = flat.reshape(d_cam.shape[1:3])
    return out


def _cameras(mesh, size):
    g = torch.Generator().manual_seed(3)
    outside = sphere_views(2, radius=1.8, fov=45.0, size=size)
    # Near plane cutting through the shape: the section behind it shows the inside.
    cut = sphere_views(2, radius=1.8, fov=45.0, size=size, near=1.8, far=2.3)
    pts, face = trimesh.sample.sample_surface(mesh, 200, seed=1)
    inside = interior_views(torch.tensor(pts), 2, g, normals=torch.tensor(mesh.face_normals[face]), offset=0.01,
                            size=size)
    return cat_cameras([outside, cut, inside.to(dtype=torch.float32)])


@pytest.mark.parametrize("group, name", [("closed", "ddg_kitten.obj"), ("open", "ddg_hemisphere.obj"),
                                         ("interior", "om_head3_nested_spheres.ply"),
                                         ("interior", "kaolin_armchair.obj")])
def test_backends_agree_with_trimesh_ray_casting(shared_meshes, group, name):
    mesh = normalised(shared_meshes / group / name)
    camera = _cameras(mesh, 24)
    v = torch.tensor(mesh.vertices, dtype=torch.float32)
    f = torch.tensor(mesh.faces, dtype=torch.long)
    ref = reference_depth(mesh, camera)
    ref_mask = np.isfinite(ref)
    assert 0.02 < ref_mask.mean() < 0.98
    backends = ["torch"] + (["embree"] if embree_available() else [])
    ids = {}
    for backend in backends:
        ids[backend] = rasterize(v, f, camera, backend=backend)
        mask = (ids[backend] >= 0).numpy()
        assert (mask == ref_mask).mean() >= 0.999, backend
        depth = surface_maps(v.double(), f, ids[backend], camera.to(dtype=torch.float64))["depth"].numpy()
        both = mask & ref_mask
        assert np.abs(depth[both] - ref[both]).max() < 1e-4, backend  # scene size is 1
    if len(backends) == 2:
        assert (ids["torch"] == ids["embree"]).float().mean() >= 0.999


def test_bounded_memory_chunks_give_the_same_ids(device):
    mesh = trimesh.creation.icosphere(3, radius=0.4)
    v, f = torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)
    cam = sphere_views(2, size=48)
    full = rasterize(v, f, cam, backend="torch")
    v, f, cam = v.to(device), f.to(device), cam.to(device)
    chunked = rasterize(v, f, cam, backend="torch", chunk=97)
    assert chunked.device.type == device.type and torch.equal(chunked.cpu(), full)
    if device.type == "cuda":  # auto is the torch path there
        assert torch.equal(rasterize(v, f, cam, backend="auto").cpu(), full)


def _floor_scene():
    """One big quad on the plane y = 0.25 (camera space), reaching from behind the camera to z = 10."""
    v = torch.tensor([[-5.0, 0.25, -3.0], [5.0, 0.25, -3.0], [5.0, 0.25, 10.0], [-5.0, 0.25, 10.0]],
                     dtype=torch.float64)
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    cam = Camera(intrinsics(90.0, 32, 24, dtype=torch.float64), torch.eye(4, dtype=torch.float64), 32, 24, 0.45, 3.0)
    return v, f, cam


@pytest.mark.parametrize("backend", ["torch", pytest.param("embree", marks=needs_embree)])
def test_triangles_crossing_the_near_plane_and_behind_the_camera(backend):
    v, f, cam = _floor_scene()
    d = cam.pixel_directions()[0]
    z_expected = torch.where(d[..., 1] > 0, 0.25 / d[..., 1], torch.full_like(d[..., 1], float("inf")))
    visible = (z_expected >= 0.45) & (z_expected <= 3.0)
    assert visible.any() and (~visible).any()   # both clipping planes cut this view
    ids = rasterize(v.float() if backend == "embree" else v, f, cam, backend=backend)
    assert torch.equal(ids[0] >= 0, visible)
    out = render(v, f, cam, backend=backend, antialias_edges=False)
    assert torch.allclose(out["depth"][0][visible], z_expected[visible], atol=1e-9)
    up = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)   # facing the camera above the floor
    assert torch.allclose(out["normal"][0][visible], up.expand(int(visible.sum()), 3))


@needs_embree
def test_auto_backend_picks_embree_on_cpu(monkeypatch):
    import sparseflex.render.visibility as vis
    calls = []
    monkeypatch.setattr(vis, "_rasterize_embree", lambda *a: calls.append(1) or vis._rasterize_torch(*a, 1 << 20))
    v, f, cam = _floor_scene()
    rasterize(v, f, cam)
    assert calls == [1]


def test_bad_meshes_and_options():
    v, f, cam = _floor_scene()
    with pytest.raises(InputError, match="no faces"):
        rasterize(v, f[:0], cam)
    with pytest.raises(InputError, match="no faces"):
        render(v, f[:0], cam)
    assert (rasterize(v, f[:0], cam, allow_empty=True) == -1).all()
    empty = render(v.requires_grad_(False), f[:0], cam, allow_empty=True)
    assert empty["mask"].sum() == 0
    with pytest.raises(InputError, match="face indices"):
        rasterize(v, f + 10, cam)
    with pytest.raises(InputError, match="NaN"):
        rasterize(v * float("nan"), f, cam)
    with pytest.raises(InputError, match=r"\[V, 3\]"):
        rasterize(v[:, :2], f, cam)
    with pytest.raises(OptionError, match="unknown visibility backend"):
        rasterize(v, f, cam, backend="opengl")

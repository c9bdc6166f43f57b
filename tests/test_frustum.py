"""Frustum-aware sectional voxels: the clip-volume test, adaptive planes reaching a visibility ratio on real meshes,
and sections that keep inactive voxels away from extraction and rendering."""

import numpy as np
import pytest
import torch
import trimesh

from sparseflex.errors import OptionError
from sparseflex.flexicubes import SparseFlex
from sparseflex.render import (adaptive_planes, cat_cameras, frustum_mask, random_views, render, section,
                               sphere_views, zoom_views)
from sparseflex.sparse import coords_to_keys, dense_grid

RESOLUTION = 64


def voxel_centres(path, resolution=RESOLUTION, samples=200_000):
    """Centres of the voxels touched by dense surface samples of the normalised mesh."""
    mesh = trimesh.load(path, force="mesh")
    mesh.apply_translation(-mesh.bounds.mean(0))
    mesh.apply_scale(1.0 / mesh.extents.max())
    pts, _ = trimesh.sample.sample_surface(mesh, samples, seed=0)
    vox = np.unique(np.clip(np.floor((pts + 0.5) * resolution), 0, resolution - 1).astype(np.int64), axis=0)
    return torch.tensor((vox + 0.5) / resolution - 0.5, dtype=torch.float32)


def test_frustum_mask_matches_pixel_bounds_and_planes():
    cam = cat_cameras([sphere_views(3, radius=1.5, fov=30.0, size=(40, 30), near=1.2, far=1.7),
                       random_views(2, torch.Generator().manual_seed(0), size=(40, 30))])
    pts = torch.rand(5000, 3, dtype=torch.float32) - 0.5
    cam_pts = cam.world_to_camera(pts)
    x, y, z = cam_pts.unbind(-1)
    K = cam.K[:, None]
    u = K[..., 0, 0] * x / z + K[..., 0, 2]
    v = K[..., 1, 1] * y / z + K[..., 1, 2]
    expected = ((z > 0) & (u >= -0.5) & (u <= 39.5) & (v >= -0.5) & (v <= 29.5)
                & (z >= cam.near[:, None]) & (z <= cam.far[:, None]))
    mask = frustum_mask(pts, cam)
    assert mask.any() and (~mask).any()
    assert (mask == expected).float().mean() > 0.9995   # float rounding on the boundaries only


@pytest.mark.parametrize("group, name", [("closed", "ddg_kitten.obj"), ("open", "dc_dress_v7k.obj"),
                                         ("interior", "tm_cycloidal.ply")])
def test_adaptive_planes_reach_the_visibility_ratio_on_real_meshes(shared_meshes, group, name):
    pts = voxel_centres(shared_meshes / group / name)
    n = len(pts)
    g = torch.Generator().manual_seed(1)
    wide = sphere_views(4, radius=2.0, fov=60.0, size=32)                 # the whole cube fits in the side planes
    cams = cat_cameras([wide, random_views(3, g, size=32), zoom_views(pts, 2, g, size=32)])
    in_sides = frustum_mask(pts, cams.with_planes(1e-3, 10.0)).sum(1)     # points inside the side planes
    assert (in_sides[:4] == n).all()
    for ratio in (0.05, 0.1, 0.3, 1.0):
        for offset in (0.0, 0.5, 1.0):
            near, far = adaptive_planes(pts, cams, ratio, offset=offset)
            assert (near > 0).all() and (near < far).all()
            active = frustum_mask(pts, cams.with_planes(near, far)).sum(1)
            target = ratio * n
            reachable = in_sides >= target
            assert ((active - target).abs()[reachable] <= 0.02 * n).all(), (ratio, offset, active, target)
            # Views that see fewer voxels than asked for activate all of them (documented shortfall).
            assert (active[~reachable] == in_sides[~reachable]).all()
            assert reachable[:4].all()


def test_offset_moves_the_section_through_the_shape(shared_meshes):
    pts = voxel_centres(shared_meshes / "closed" / "ddg_kitten.obj")
    cam = sphere_views(1, radius=2.0, fov=60.0, size=16)
    front, back = (adaptive_planes(pts, cam, 0.1, offset=o) for o in (0.0, 1.0))
    assert front[1] < back[0] + 1e-6                     # the nearest and farthest tenths do not overlap
    # With offset 1 the near plane cuts through the shape: the section behind it includes the far side.
    z = cam.world_to_camera(pts)[0, :, 2]
    assert back[1] >= z.max() - 1e-4


def test_sections_keep_inactive_voxels_out_of_extraction_and_rendering():
    r = 32
    coords = dense_grid(r)
    centres = (coords[:, 1:].double() + 0.5) / r - 0.5
    shell = (centres.norm(dim=1) - 0.3).abs() < 2.0 / r
    coords, centres = coords[shell], centres[shell].float()
    sf = SparseFlex.from_sdf(coords, r, lambda p: p.norm(dim=1) - 0.3)
    full = sf.extract()
    cams, mask = section(centres, sphere_views(3, radius=1.5, fov=50.0, size=48), 0.2, offset=0.3)
    assert ((mask.float().mean(1) - 0.2).abs() <= 0.02).all()
    active_keys = coords_to_keys(coords)
    for b in range(len(cams)):
        part = sf.select(mask[b]).extract()
        assert 0 < len(part.faces) < len(full.faces)
        # Undeformed dual vertices lie inside their own voxel: every one belongs to an active voxel.
        cell = torch.floor((part.vertices.detach() + 0.5) * r).long().clamp(0, r - 1)
        keys = coords_to_keys(cell)
        assert torch.isin(keys, active_keys[mask[b]]).all()
        # Rendering the section and the ground truth with the same sectioned camera clips both alike.
        pred = render(part.vertices.float(), part.faces, cams[b])
        gt = render(full.vertices.float(), full.faces, cams[b], antialias_edges=False)
        hit = gt["tri_id"] >= 0
        assert ((gt["depth"][hit] >= cams.near[b] - 1e-5) & (gt["depth"][hit] <= cams.far[b] + 1e-5)).all()
        assert (pred["mask"] > 0.5).float().mean() > 0
        assert (pred["tri_id"] >= 0)[~hit].float().mean() < 0.05   # the section draws where the truth is seen


def test_bad_ratios_raise():
    pts = torch.rand(100, 3) - 0.5
    cam = sphere_views(1, size=8)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(OptionError, match="visibility ratio"):
            adaptive_planes(pts, cam, bad)
    with pytest.raises(OptionError, match="offset"):
        adaptive_planes(pts, cam, 0.5, offset=2.0)


@pytest.mark.parametrize("kind", ["spread", "ties", "constant", "clustered"])
def test_ranked_depths_equal_the_sorted_depths(kind):
    """The sort-free order statistics of the adaptive planes against torch.sort / torch.searchsorted."""
    from sparseflex.render.frustum import _Ranked
    g = torch.Generator().manual_seed(0)
    values = {"spread": torch.rand(50_000, generator=g) * 3 + 0.5,
              "ties": (torch.rand(50_000, generator=g) * 40).round() / 10,    # 41 distinct values
              "constant": torch.full((1000,), 1.25),
              "clustered": torch.cat([torch.rand(49_990, generator=g) * 1e-6 + 1, torch.rand(10, generator=g) * 5])
              }[kind]
    ranked, ref = _Ranked(values), torch.sort(values).values
    ranks = [0, 1, len(values) // 3, len(values) // 2, len(values) - 2, -1] + torch.randint(
        len(values), (20,), generator=g).tolist()
    for i in ranks:
        assert ranked[i] == ref[i], i
        value = ref[i]
        assert ranked.searchsorted(value) == int(torch.searchsorted(ref, value))
        assert ranked.searchsorted(value, right=True) == int(torch.searchsorted(ref, value, right=True))

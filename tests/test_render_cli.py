"""`sparseflex render`: PNG grid and views.npz whose arrays an independent ray caster reproduces; clear errors."""

import numpy as np
import pytest
import trimesh
from PIL import Image
from trimesh.ray.ray_triangle import RayMeshIntersector

from sparseflex.cli import main

pytest.importorskip("sparseflex.data.mesh")


def _check_against_trimesh(npz, mesh):
    """Cast each saved camera's pixel rays at the normalised mesh with trimesh and compare mask and depth."""
    K, E, near, far = npz["K"], npz["extrinsics"], npz["near"], npz["far"]
    b, h, w = npz["depth"].shape
    caster = RayMeshIntersector(mesh)
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    pix = np.stack([jj, ii, np.ones_like(jj)], -1).reshape(-1, 3).astype(np.float64)
    for v in range(b):
        R, t = E[v, :3, :3].astype(np.float64), E[v, :3, 3].astype(np.float64)
        d_cam = pix @ np.linalg.inv(K[v].astype(np.float64)).T            # z = 1
        origin = -R.T @ t
        loc, ray, _ = caster.intersects_location(np.repeat(origin[None], len(pix), 0), d_cam @ R, multiple_hits=True)
        z = (loc @ R.T + t)[:, 2]
        ok = (z >= near[v]) & (z <= far[v])
        depth = np.full(len(pix), np.inf)
        np.minimum.at(depth, ray[ok], z[ok])
        hit = np.isfinite(depth).reshape(h, w)
        assert (hit == npz["mask"][v]).mean() >= 0.999
        both = hit & npz["mask"][v]
        assert np.abs(npz["depth"][v][both] - depth.reshape(h, w)[both]).max() < 1e-4


def test_render_writes_png_and_checkable_arrays(shared_meshes, tmp_path, capsys):
    src = shared_meshes / "open" / "ddg_hemisphere.obj"
    out = tmp_path / "out"
    assert main(["render", str(src), "-o", str(out), "--views", "3", "--size", "32"]) == 0
    assert '"views": 3' in capsys.readouterr().out
    png = Image.open(out / "views.png")
    assert png.width > 3 * 32 and png.height > 2 * 32
    npz = np.load(out / "views.npz")
    assert npz["mask"].shape == (3, 32, 32) and npz["normal"].shape == (3, 32, 32, 3)
    assert npz["K"].shape == (3, 3, 3) and npz["extrinsics"].shape == (3, 4, 4) and npz["near"].shape == (3,)
    assert "OpenCV" in str(npz["convention"])
    raw = trimesh.load(src, force="mesh")
    assert np.allclose(npz["normalization_center"], raw.bounds.mean(0), atol=1e-6)
    assert np.isclose(npz["normalization_scale"], 1 / raw.extents.max())
    m = npz["mask"]
    assert 0.05 < m.mean() < 0.9
    assert np.allclose(np.linalg.norm(npz["normal"][m], axis=-1), 1, atol=1e-5)
    assert (npz["depth"][~m] == 0).all()
    mesh = trimesh.load(src, force="mesh")
    mesh.apply_translation(-mesh.bounds.mean(0))
    mesh.apply_scale(1.0 / mesh.extents.max())
    _check_against_trimesh(npz, mesh)
    # Normals face the camera: n . (ray direction) < 0 on every covered pixel, both sides of the open bowl.
    jj, ii = np.meshgrid(np.arange(32), np.arange(32))
    d_cam = np.stack([jj, ii, np.ones_like(jj)], -1) @ np.linalg.inv(npz["K"][0]).T
    assert ((npz["normal"][0] * d_cam).sum(-1)[m[0]] < 0).all()


def test_render_errors_exit_2(shared_meshes, tmp_path, capsys):
    src = shared_meshes / "closed" / "ajc_spot.obj"
    out = tmp_path / "o"
    assert main(["render", str(tmp_path / "missing.obj"), "-o", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["render", str(src), "-o", str(out), "--views", "1", "--size", "16"]) == 0
    assert main(["render", str(src), "-o", str(out), "--views", "1", "--size", "16"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["render", str(src), "-o", str(out), "--views", "1", "--size", "16", "--overwrite"]) == 0
    assert main(["render", str(src), "-o", str(out), "--views", "1000", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--views" in err[0]
    assert main(["render", str(src), "-o", str(out), "--size", "0"]) == 2  # refused when parsed, as one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --size")

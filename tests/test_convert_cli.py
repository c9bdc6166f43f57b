"""`sparseflex convert`: output in the input's coordinates, metrics printed, bad input and options refused."""

import json

import numpy as np
import pytest
import torch
import trimesh

from sparseflex.cli import main
from sparseflex.data.mesh import Mesh, save_mesh


@pytest.fixture
def sphere_file(tmp_path):
    m = Mesh.from_trimesh(trimesh.creation.icosphere(4, radius=3.0))
    m.vertices = m.vertices + torch.tensor([10.0, 0.0, -4.0])
    path = tmp_path / "sphere.obj"
    save_mesh(path, m)
    return path


def test_convert_round_trip(sphere_file, tmp_path, capsys):
    out = tmp_path / "out.ply"
    assert main(["convert", str(sphere_file), "-o", str(out), "--resolution", "64", "--metrics-points", "20000"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["fscore@0.01"] >= 99
    assert report["metrics"]["normal_consistency"] >= 0.99
    # memory accounting (issue 20): the peak resident memory of this process, divided by the voxels
    from sparseflex.eval.resources import peak_memory_bytes
    assert 0 < report["peak_memory_gb"] * 1e9 <= peak_memory_bytes() * 1.01
    assert report["bytes_per_voxel"] == pytest.approx(report["peak_memory_gb"] * 1e9 / report["voxels"], rel=0.05)
    fitted = trimesh.load(out, process=False)
    assert fitted.is_watertight
    assert np.allclose(fitted.bounds.mean(0), [10.0, 0.0, -4.0], atol=0.05)  # back in the input's frame
    assert fitted.extents.max() == pytest.approx(6.0, rel=0.02)
    # the output is never overwritten silently
    assert main(["convert", str(sphere_file), "-o", str(out), "--resolution", "64"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("opts", [["--resolution", "4"], ["--resolution", "4096"], ["--dilation", "9"]])
def test_convert_bad_options(sphere_file, tmp_path, capsys, opts):
    assert main(["convert", str(sphere_file), "-o", str(tmp_path / "o.ply"), *opts]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("content", [b"", b"not a mesh at all \x00\x01", b"v 0 0 0\nv 1 0 0\nv 0 1 0\n",
                                     b"v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n"])
def test_convert_bad_input(tmp_path, capsys, content):
    path = tmp_path / "bad.obj"
    path.write_bytes(content)
    assert main(["convert", str(path), "-o", str(tmp_path / "o.ply")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "bad.obj" in err


def test_convert_keeps_a_thin_plate_unless_told_not_to(tmp_path, capsys):
    """A plate 0.3 voxels thick at resolution 32 survives by default; ``--no-thin-sheets`` gives the plain SDF."""
    def box(lo, hi):
        b = trimesh.creation.box(extents=np.subtract(hi, lo))
        b.apply_translation(np.add(lo, hi) / 2)
        return b
    z0, t = 0.37 / 32, 0.3 / 32  # between two corner planes: no corner inside the plate
    # two small cubes in opposite corners make the bounding box [-0.5, 0.5]^3: normalisation is the identity
    parts = [box([-0.4, -0.4, z0 - t / 2], [0.4, 0.4, z0 + t / 2]),
             box([0.45, 0.45, 0.45], [0.5, 0.5, 0.5]), box([-0.5, -0.5, -0.5], [-0.45, -0.45, -0.45])]
    src = tmp_path / "plate.obj"
    save_mesh(src, Mesh.from_trimesh(trimesh.util.concatenate(parts)))
    areas = {}
    for flag in ([], ["--no-thin-sheets"]):
        out = tmp_path / f"out{len(flag)}.ply"
        assert main(["convert", str(src), "-o", str(out), "--resolution", "32", "--no-metrics", *flag]) == 0
        capsys.readouterr()
        areas[bool(flag)] = trimesh.load(out, process=False).area
    assert areas[False] - areas[True] == pytest.approx(2 * 0.8 * 0.8, rel=0.03)  # both faces of the plate

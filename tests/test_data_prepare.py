"""`sparseflex data prepare / stats`: good meshes prepared, bad ones reported, resumable, shards equal one run."""

import contextlib
import io
import json
import os
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import trimesh

from sparseflex import cli
from sparseflex.data import manifest
from sparseflex.data.item import load_item
from sparseflex.data.mesh import Mesh
from sparseflex.data.voxelize import voxelize
from sparseflex.data.prepare import PrepareConfig, parse_shard, prepare_dataset, select_shard
from sparseflex.data.workers import run_tasks
from sparseflex.errors import OptionError
from sparseflex.eval.metrics import SurfaceDistance
from sparseflex.sparse.coords import VoxelHash, subdivide

SMALL = ["--points", "2048", "--resolution", "8", "--levels", "2", "--views", "2", "--image-size", "32",
         "--timeout", "120"]
GOOD = ["box.stl", "moebius.obj", "scene.glb", "sphere.obj", "sub__cylinder.off"]
BAD = {"corrupt.ply": "cannot read", "empty.obj": "empty", "nan.obj": "NaN"}


def run_cli(*argv) -> tuple[int, str, str]:
    """Run `sparseflex ...` in this process (registering `data` if the command list lacks it)."""
    commands = cli.COMMANDS if "data" in cli.COMMANDS else cli.COMMANDS + ["data"]
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(cli, "COMMANDS", commands), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("meshes")
    (root / "sub").mkdir()
    trimesh.creation.icosphere(subdivisions=2).export(root / "sphere.obj")
    trimesh.creation.box(extents=(1.0, 2.0, 0.5)).export(root / "box.stl")
    trimesh.creation.cylinder(radius=0.3, height=1.0, sections=16).export(root / "sub" / "cylinder.off")
    scene = trimesh.Scene()
    for name, x in (("left", -2.0), ("right", 2.0)):
        scene.add_geometry(trimesh.creation.box(), node_name=name,
                           transform=trimesh.transformations.translation_matrix([x, 0.0, 0.0]))
    scene.export(root / "scene.glb")
    shared = Path(__file__).resolve().parents[1].parent / "shared/data/meshes/open/gc_moebius.obj"
    if shared.exists():  # a real third-party mesh (448 triangles, 112 boundary edges): linked, never copied
        os.symlink(shared, root / "moebius.obj")
    else:
        trimesh.creation.annulus(0.2, 0.5, 0.1).export(root / "moebius.obj")
    (root / "empty.obj").write_bytes(b"")
    (root / "corrupt.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\n" + bytes(range(256)) * 3)
    (root / "nan.obj").write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n")
    (root / "notes.txt").write_text("not a mesh")
    return root


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    code, stdout, stderr = run_cli("data", "prepare", inputs, out, "--workers", "2", *SMALL)
    return out, code, stdout, stderr


def test_good_items_prepared_bad_ones_reported(prepared, inputs):
    out, code, stdout, _ = prepared
    assert code == 0
    assert "failed 3" in stdout
    records = manifest.read_manifest(out)
    assert [r["name"] for r in records] == GOOD
    failures = {r["name"]: r["reason"] for r in json.loads((out / "failures.json").read_text())}
    assert failures.keys() == BAD.keys()
    for name, word in BAD.items():
        assert word in failures[name]
    by_name = {r["name"]: r for r in records}
    assert by_name["sphere.obj"]["triangles"] == 320 and by_name["sphere.obj"]["watertight"]
    assert by_name["scene.glb"]["triangles"] == 24 and by_name["scene.glb"]["components"] == 2
    if (inputs / "moebius.obj").is_symlink():  # the counts of the shared MANIFEST.tsv
        moebius = by_name["moebius.obj"]
        assert (moebius["triangles"], moebius["boundary_edges"], moebius["components"]) == (448, 112, 1)
        assert not moebius["watertight"]
    assert by_name["sub__cylinder.off"]["source"] == "sub/cylinder.off"
    for r in records:
        assert (out / r["file"]).stat().st_size == r["bytes"]
        assert set(r["voxels"]) == {"8", "16", "32"}
    assert {r["split"] for r in records} == {"train", "val"}


def test_item_contents(prepared, inputs):
    out = prepared[0]
    scene = load_item(out / "items" / "scene.glb.npz", with_images=True)
    v = scene["vertices"]
    # two unit boxes centred at x = -2 and 2: extent 5 along x -> normalised x in [-0.5, 0.5], y and z in +-0.1
    assert torch.allclose(v.amin(0), torch.tensor([-0.5, -0.1, -0.1]), atol=1e-6)
    assert torch.allclose(v.amax(0), torch.tensor([0.5, 0.1, 0.1]), atol=1e-6)
    for name in GOOD:
        item = load_item(out / "items" / f"{name}.npz", with_images=True)
        pts = item["points"]
        assert pts.shape == (2048, 3) and item["normals"].shape == (2048, 3)
        # points lie on the normalised mesh (quantisation error only) and normals are unit
        dist, face = SurfaceDistance(item["vertices"], item["faces"]).query(pts)
        assert dist.max() < 2e-5
        assert torch.allclose(item["normals"].norm(dim=1), torch.ones(2048), atol=2e-3)
        # each point's voxel is active at every level; every level nests in the previous one's children
        levels = [(8, item["coords"])] + list(zip(item["levels"], item["occupancy"]))
        assert item["levels"] == [16, 32]
        for res, coords in levels:
            assert coords.min() >= 0 and coords.max() < res
            cell = torch.floor((pts.double() + 0.5) * res).long().clamp(0, res - 1)
            assert (VoxelHash(coords).lookup(cell) >= 0).all()
        for (_, parent), (_, child) in zip(levels[:-1], levels[1:]):
            assert (VoxelHash(subdivide(parent)).lookup(child) >= 0).all()
        # occupancy = the voxels the surface touches; the latent set holds them (plus jittered neighbours)
        mesh = Mesh(item["vertices"], item["faces"])
        for res, occ in zip(item["levels"], item["occupancy"]):
            assert torch.equal(occ, voxelize(mesh, res))
        assert (VoxelHash(item["coords"]).lookup(voxelize(mesh, 8)) >= 0).all()
        # the conditioning renders frame the whole mesh and cover part of the image
        cams, images = item["cameras"], item["images"]
        assert images.shape == (2, 32, 32, 4) and images.dtype == torch.uint8
        rot, shift = cams.extrinsics[:, None, :3, :3], cams.extrinsics[:, None, :3, 3]
        cam = (rot @ item["vertices"][None, :, :, None])[..., 0] + shift
        uv = (cams.K[:, None] @ cam[..., None])[..., 0]
        uv = uv[..., :2] / uv[..., 2:]
        assert (uv > -0.5).all() and (uv < 31.5).all()
        coverage = (images[..., 3] > 0).float().mean()
        assert 0.01 < coverage < 0.9


def test_second_run_does_no_work(prepared, inputs):
    out = prepared[0]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "items").iterdir()}
    code, stdout, _ = run_cli("data", "prepare", inputs, out, "--workers", "2", *SMALL)
    assert code == 0
    assert "skipping 8 of 8" in stdout and "prepared 0" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "items").iterdir()} == before


def test_shards_equal_one_run(prepared, inputs, tmp_path):
    out = prepared[0]
    for shard in ("1/2", "0/2"):
        code, _, _ = run_cli("data", "prepare", inputs, tmp_path, "--workers", "1", "--shard", shard, *SMALL)
        assert code == 0
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["shard-00000-of-00002.jsonl",
                                                                       "shard-00001-of-00002.jsonl"]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "bytes")}  # noqa: E731
    assert [strip(r) for r in manifest.read_manifest(tmp_path)] == [strip(r) for r in manifest.read_manifest(out)]
    assert json.loads((tmp_path / "failures.json").read_text()) == json.loads((out / "failures.json").read_text())
    for name in GOOD:
        with np.load(out / "items" / f"{name}.npz") as a, np.load(tmp_path / "items" / f"{name}.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), (name, key)


def test_timeout_is_reported_and_run_goes_on(inputs, tmp_path):
    code, stdout, _ = run_cli("data", "prepare", inputs, tmp_path, "--workers", "1", "--shard", "6/8",
                              *SMALL[:-1], "0.001")  # one item: sphere.obj
    assert code == 0 and "failed 1" in stdout
    (failure,) = json.loads((tmp_path / "failures.json").read_text())
    assert failure["name"] == "sphere.obj" and failure["reason"].startswith("timed out")
    assert not any((tmp_path / "items").iterdir())


def test_other_settings_in_same_folder_is_an_error(prepared, inputs):
    other = SMALL[:2] + ["--resolution", "16"] + SMALL[4:]
    code, _, stderr = run_cli("data", "prepare", inputs, prepared[0], "--workers", "0", *other)
    assert code == 2 and stderr.startswith("error:") and "resolution=8" in stderr


def test_stats(prepared):
    out = prepared[0]
    code, stdout, _ = run_cli("data", "stats", out)
    assert code == 0
    assert re.search(r"^items prepared +5$", stdout, re.M) and re.search(r"^items failed +3$", stdout, re.M)
    assert re.search(r"^voxels at 32\^3 +mean", stdout, re.M)
    assert re.search(r"^failed: file is empty +1$", stdout, re.M)
    sheet = out / "contact_sheet.png"
    from PIL import Image
    with Image.open(sheet) as img:
        assert img.width > 5 * 128 and img.height >= 128


def test_shard_selection_and_split():
    items = list(range(23))
    parts = [select_shard(items, i, 4) for i in range(4)]
    assert sorted(sum(parts, [])) == items and all(not set(a) & set(b) for a in parts for b in parts if a is not b)
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/2", "1", "a/b"):
        with pytest.raises(OptionError):
            parse_shard(bad)
    names = [f"mesh{i}" for i in range(2000)]
    split = manifest.assign_split(names, 0.1)
    assert abs(sum(v == "val" for v in split.values()) / 2000 - 0.1) < 0.03
    # an item's split does not depend on the other items
    assert manifest.assign_split(names[:500], 0.1) == {n: split[n] for n in names[:500]}
    assert sorted(manifest.assign_split(["a", "b"], 0.01).values()) == ["train", "val"]
    with pytest.raises(OptionError):
        PrepareConfig(val_fraction=1.0)


def test_worker_pool_survives_crashes_and_exceptions():
    # the builtin eval as the task function: spawned workers need not import this (heavy) test module
    tasks = ["1 + 1", "__import__('os')._exit(3)", "2 + 2", "int('x')", "3 + 3"]
    results = {r.index: (r.ok, r.value) for r in run_tasks(eval, tasks, workers=1, timeout=60)}
    assert results == {0: (True, 2), 1: (False, "worker process died (exit code 3)"), 2: (True, 4),
                       3: (False, "ValueError: invalid literal for int() with base 10: 'x'"), 4: (True, 6)}
    inline = {r.index: (r.ok, r.value) for r in run_tasks(eval, ["1 + 1", "int('x')"], workers=0)}
    assert inline == {0: (True, 2), 1: (False, "ValueError: invalid literal for int() with base 10: 'x'")}


def test_a_result_after_the_deadline_is_a_timeout():
    # 0.05 s tasks finish well inside one poll interval (0.2 s) yet past a 0.01 s deadline
    tasks = ["__import__('time').sleep(0.05)"] * 2
    results = [(r.ok, r.value) for r in run_tasks(eval, tasks, workers=1, timeout=0.01)]
    assert results == [(False, "timed out after 0.01 s")] * 2
    assert [r.ok for r in run_tasks(eval, tasks, workers=1, timeout=5)] == [True, True]


def test_retry_failed_after_the_file_is_fixed(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "late.obj").write_bytes(b"")
    config = PrepareConfig(points=256, resolution=4, levels=1, views=0)
    quiet = dict(workers=0, log=lambda _: None)
    assert prepare_dataset(src, out, config, **quiet).failed == 1
    trimesh.creation.box().export(src / "late.obj")
    again = prepare_dataset(src, out, config, **quiet)
    assert (again.skipped, again.prepared) == (1, 0)  # a failure counts as finished ...
    retry = prepare_dataset(src, out, config, retry_failed=True, **quiet)
    assert (retry.prepared, retry.failed) == (1, 0)   # ... until asked to retry
    assert [r["name"] for r in manifest.read_manifest(out)] == ["late.obj"]
    assert json.loads((out / "failures.json").read_text()) == []

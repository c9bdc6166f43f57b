"""`sparseflex data encode / latent-stats`: every prepared item encoded once (the VAE's mean on the item's own arrays),
resumable and sharded, statistics and normalisation, the latent dataset, and the error contract."""

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file

from sparseflex import cli
from sparseflex.data import manifest
from sparseflex.data.item import load_item
from sparseflex.data.latents import (LatentDataset, collate, denormalize_latent, encode_dataset, latent_stats,
                                     normalize_latent, read_stats)
from sparseflex.data.prepare import shard_lock
from sparseflex.errors import OptionError
from sparseflex.models import SparseFlexVAE, save_weights
from sparseflex.nn import SparseTensor

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["box.stl", "cylinder.off", "sphere.obj"]


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def random_vae(seed: int) -> SparseFlexVAE:
    """A tiny VAE with random weights (a zero-initialised output layer would make every latent 0)."""
    model = SparseFlexVAE("tiny")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    meshes = tmp_path_factory.mktemp("meshes")
    trimesh.creation.icosphere(subdivisions=2).export(meshes / "sphere.obj")
    trimesh.creation.box(extents=(1.0, 2.0, 0.5)).export(meshes / "box.stl")
    trimesh.creation.cylinder(radius=0.3, height=1.0, sections=12).export(meshes / "cylinder.off")
    out = tmp_path_factory.mktemp("prepared")
    code, _, err = run_cli("data", "prepare", meshes, out, "--workers", "0", "--points", "600", "--resolution", "8",
                           "--levels", "1", "--views", "2", "--image-size", "16")
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """The VAE as a training checkpoint, and another VAE as safetensors."""
    root = tmp_path_factory.mktemp("vae")
    model = random_vae(0)
    ckpt = root / "train.pt"
    torch.save({"format": "sparseflex-train-1", "model_config": model.config.to_dict(), "model": model.state_dict(),
                "ema": model.state_dict(), "step": 1}, ckpt)
    other = save_weights(random_vae(1), root / "other.safetensors")
    return ckpt, model, other


@pytest.fixture(scope="module")
def encoded(prepared, vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "latents"
    code, stdout, err = run_cli("data", "encode", prepared, "--checkpoint", vae[0], "-o", out, "--batch-size", "2",
                                "--device", "cpu")
    assert code == 0, err
    assert "encoded 3, skipped 0" in stdout
    return out


def latents_of(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {r["name"]: load_file(root / r["file"]) for r in manifest.read_manifest(root)}


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_feats_are_the_vae_mean_on_each_prepared_item(prepared, vae, encoded):
    ckpt, model, _ = vae
    records = {r["name"]: r for r in manifest.read_manifest(prepared)}
    assert [r["name"] for r in manifest.read_manifest(encoded)] == NAMES
    for rec in manifest.read_manifest(encoded):
        item = load_item(prepared / records[rec["name"]]["file"])
        with torch.no_grad():
            mean, _ = model.encode(item["points"], item["normals"], torch.zeros(len(item["points"]), dtype=torch.long),
                                   item["coords"], item["resolution"])
        stored = load_file(encoded / rec["file"])
        assert set(stored) == {"coords", "feats"}  # no logvar unless asked for
        assert stored["coords"].dtype == torch.int16 and stored["feats"].dtype == torch.float32
        assert torch.equal(stored["coords"].long(), item["coords"])
        assert stored["feats"].shape == (len(item["coords"]), 8) and stored["feats"].abs().max() > 0
        # batched with another item (2 per call) vs alone: equal up to float32 rounding
        torch.testing.assert_close(stored["feats"], mean.feats, rtol=1e-5, atol=1e-5)
        assert rec["split"] == records[rec["name"]]["split"] and rec["voxels"] == len(item["coords"])
        assert rec["prepared"] == records[rec["name"]]["file"]
    config = json.loads((encoded / "config.json").read_text())
    assert config["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert config["vae_config"] == model.config.to_dict()
    assert config["resolution"] == 8 and config["prepared"] == str(prepared.resolve())
    assert json.loads((encoded / "failures.json").read_text()) == []


def test_resume_after_a_partial_run_equals_one_shot_and_shards_merge(prepared, vae, encoded, tmp_path):
    one_shot = latents_of(encoded)
    # a run killed after shard 0/2 (items 0 and 2), leaving a temporary file of the item it was writing
    part = tmp_path / "partial"
    encode_dataset(prepared, vae[0], part, shard=(0, 2), device="cpu", progress=False, log=lambda _: None)
    done = snapshot(part / "items")
    assert sorted(done) == [f"{n}.safetensors" for n in NAMES[::2]]
    (part / "items" / ".cylinder.off.k1lled00.tmp.safetensors").write_bytes(b"half")
    result = encode_dataset(prepared, vae[0], part, device="cpu", progress=False, log=lambda _: None)
    assert (result.encoded, result.skipped, result.failed) == (1, 2, 0)
    after = snapshot(part / "items")
    assert {k: after[k] for k in done} == done  # the finished items were not touched
    assert sorted(after) == [f"{n}.safetensors" for n in NAMES]  # the temporary file is gone
    # two shards into one folder, the second shard first
    both = tmp_path / "shards"
    for shard in ((1, 2), (0, 2)):
        encode_dataset(prepared, vae[0], both, shard=shard, device="cpu", batch_size=1, progress=False,
                       log=lambda _: None)
    assert len(list((both / "parts").glob("*.jsonl"))) == 2
    for root in (part, both):
        merged = latents_of(root)
        assert merged.keys() == one_shot.keys()
        for name, t in merged.items():
            assert torch.equal(t["coords"], one_shot[name]["coords"])
            torch.testing.assert_close(t["feats"], one_shot[name]["feats"], rtol=1e-5, atol=1e-5)
        assert manifest.read_manifest(root) == manifest.read_manifest(encoded)
        assert read_stats(root)["count"] == read_stats(encoded)["count"]


def test_a_resume_with_another_checkpoint_is_refused(vae, encoded, prepared, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(encoded, out)
    before = snapshot(out)
    code, stdout, err = run_cli("data", "encode", prepared, "--checkpoint", vae[2], "-o", out)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "another VAE checkpoint" in err
    assert snapshot(out) == before
    # --overwrite starts again with the new VAE
    code, _, err = run_cli("data", "encode", prepared, "--checkpoint", vae[2], "-o", out, "--overwrite", "--logvar")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["checkpoint_sha256"] == hashlib.sha256(vae[2].read_bytes()).hexdigest() and config["logvar"]
    new = latents_of(out)
    assert all(not torch.allclose(new[n]["feats"], t["feats"]) for n, t in latents_of(encoded).items())
    assert all(t["logvar"].dtype == torch.float16 and t["logvar"].shape == t["feats"].shape for t in new.values())


def test_same_shard_twice_is_refused(prepared, vae, encoded):
    with shard_lock(encoded, (0, 1)):
        with pytest.raises(OptionError, match="in use by another encode run"):
            encode_dataset(prepared, vae[0], encoded, device="cpu", progress=False, log=lambda _: None)


def test_stats_equal_numpy_over_the_train_voxels(encoded):
    train = [r for r in manifest.read_manifest(encoded) if r["split"] == "train"]
    assert 1 <= len(train) < 3
    feats = np.concatenate([load_file(encoded / r["file"])["feats"].numpy() for r in train]).astype(np.float64)
    written = json.loads((encoded / "stats.json").read_text())  # by `data encode` itself
    code, stdout, err = run_cli("data", "latent-stats", encoded)
    assert code == 0, err
    printed = json.loads(stdout)
    for stats in (written, printed, latent_stats(encoded)):
        assert stats["count"] == len(feats)
        np.testing.assert_allclose(stats["mean"], feats.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats["std"], feats.std(0), rtol=1e-12, atol=1e-12)
    every = np.concatenate([t["feats"].numpy() for t in latents_of(encoded).values()]).astype(np.float64)
    code, stdout, _ = run_cli("data", "latent-stats", encoded, "--split", "all")
    assert code == 0 and json.loads(stdout)["count"] == len(every)
    np.testing.assert_allclose(json.loads(stdout)["std"], every.std(0), rtol=1e-12)
    assert json.loads((encoded / "stats.json").read_text())["count"] == len(feats)  # stats.json stays the train's


def test_normalize_denormalize_round_trip(encoded):
    stats = read_stats(encoded)
    train = collate([LatentDataset(encoded, with_images=False)[i] for i in range(len(LatentDataset(encoded)))])
    z = normalize_latent(train["feats"], stats)
    torch.testing.assert_close(z.double().mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.double().std(0, unbiased=False), torch.ones(8, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(3)) * 4 + 2
    torch.testing.assert_close(denormalize_latent(normalize_latent(x, stats), stats), x, rtol=2e-6, atol=2e-6)
    # a channel the VAE leaves constant (std 0) stays finite
    flat = {"mean": [1.0] * 8, "std": [0.0] + [1.0] * 7, "count": 1}
    assert torch.isfinite(normalize_latent(x, flat)).all()
    torch.testing.assert_close(denormalize_latent(normalize_latent(x, flat), flat), x, rtol=1e-5, atol=1e-5)


def test_dataset_items_and_collate_layout(encoded, prepared):
    ds = LatentDataset(encoded, split="all")
    assert len(ds) == 3 and len(LatentDataset(encoded)) + len(LatentDataset(encoded, "val")) == 3
    prepared_records = {r["name"]: r for r in manifest.read_manifest(prepared)}
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        raw = load_file(encoded / "items" / f"{it['name']}.safetensors")
        assert it["coords"].dtype == torch.int64 and torch.equal(it["coords"], raw["coords"].long())
        assert it["feats"].dtype == torch.float32 and torch.equal(it["feats"], raw["feats"])  # raw, not normalised
        assert it["resolution"] == 8 and "logvar" not in it
        with np.load(prepared / prepared_records[it["name"]]["file"]) as z:
            expected = z["images"]
        assert it["images"].dtype == torch.uint8 and it["images"].shape == (2, 16, 16, 4)
        assert np.array_equal(it["images"].numpy(), expected)
    batch = collate(items)
    sizes = [len(it["coords"]) for it in items]
    assert batch["coords"].shape == (sum(sizes), 4) and batch["feats"].shape == (sum(sizes), 8)
    assert torch.equal(batch["coords"][:, 0], torch.repeat_interleave(torch.arange(3), torch.tensor(sizes)))
    assert torch.equal(batch["coords"][:, 1:], torch.cat([it["coords"] for it in items]))
    assert torch.equal(batch["feats"], torch.cat([it["feats"] for it in items]))
    assert batch["names"] == [it["name"] for it in items] and batch["resolution"] == 8
    assert all(a is it["images"] for a, it in zip(batch["images"], items))
    sparse = SparseTensor(batch["coords"], batch["feats"])
    assert sparse.batch_size == 3 and [s.stop - s.start for s in sparse.layout] == sizes
    assert "images" not in LatentDataset(encoded, with_images=False)[0]


def test_a_bad_item_is_reported_and_skipped(prepared, vae, tmp_path):
    broken = tmp_path / "prepared"
    shutil.copytree(prepared, broken)
    (broken / "items" / "box.stl.npz").write_bytes(b"not a zip")
    out = tmp_path / "latents"
    code, stdout, err = run_cli("data", "encode", broken, "--checkpoint", vae[0], "-o", out)
    assert code == 0 and "Traceback" not in err
    assert "encoded 2, skipped 0 (already encoded), failed 1" in stdout
    failures = json.loads((out / "failures.json").read_text())
    assert [f["name"] for f in failures] == ["box.stl"] and "not a readable prepared item" in failures[0]["reason"]
    assert [r["name"] for r in manifest.read_manifest(out)] == ["cylinder.off", "sphere.obj"]
    assert not (out / "items" / "box.stl.safetensors").exists()


@pytest.fixture
def wrong_kind(tmp_path):
    """A training checkpoint of another model (a structure VAE), and a file that is no checkpoint at all."""
    structure = tmp_path / "structure.pt"
    torch.save({"format": "sparseflex-train-1", "config": {"task": "structure_vae"},
                "model": {"encoder.conv_in.weight": torch.zeros(4, 1, 3, 3, 3)}, "step": 1}, structure)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    return structure, text


@pytest.mark.parametrize("case", ["no prepared folder", "not a prepared folder", "no checkpoint",
                                  "structure checkpoint", "text checkpoint", "output is a file",
                                  "output is the prepared folder", "output is foreign", "bad shard", "batch size 0",
                                  "stats of a prepared folder"])
def test_bad_inputs_give_one_line_and_exit_2(case, prepared, vae, wrong_kind, tmp_path):
    out = tmp_path / "new" / "latents"
    source, ckpt, extra = prepared, vae[0], []
    if case == "no prepared folder":
        source = tmp_path / "missing"
    elif case == "not a prepared folder":
        source = tmp_path
    elif case == "no checkpoint":
        ckpt = tmp_path / "missing.pt"
    elif case == "structure checkpoint":
        ckpt = wrong_kind[0]
    elif case == "text checkpoint":
        ckpt = wrong_kind[1]
    elif case == "output is a file":
        out = wrong_kind[1]
    elif case == "output is the prepared folder":
        out = prepared
    elif case == "output is foreign":
        out = tmp_path / "foreign"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "bad shard":
        extra = ["--shard", "2/2"]
    elif case == "batch size 0":
        extra = ["--batch-size", "0"]
    before = snapshot(tmp_path), snapshot(prepared)
    if case == "stats of a prepared folder":
        argv = ["data", "latent-stats", prepared]
    else:
        argv = ["data", "encode", source, "--checkpoint", ckpt, "-o", out, *extra]
    code, stdout, err = run_cli(*argv)
    assert code == 2, err
    assert stdout == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert (snapshot(tmp_path), snapshot(prepared)) == before  # nothing created, nothing changed
    assert not (tmp_path / "new").exists()

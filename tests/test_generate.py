"""Image-to-3D, part 2: the SLat flow task (batch = mean of items, exact resume, latent statistics stored and applied),
pipeline files, `sparseflex generate` and its errors; and, trained end to end on two shapes at CPU size, a generator
that regenerates each shape's latent on its true structure and each shape from a render of it."""

import json

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from sparseflex.cli import main
from sparseflex.data.latents import LatentDataset, denormalize_latent, normalize_latent
from sparseflex.errors import InputError
from sparseflex.models import SparseFlexVAE, save_weights
from sparseflex.pipelines.generate import ImageTo3DPipeline, load_slat_flow, read_pipeline
from sparseflex.train.config import load_config
from sparseflex.train.generation_tasks import SLatFlowTask
from sparseflex.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def random_vae(seed=0):
    """A tiny VAE with random weights (every head channel live, children kept) so latents decode to surfaces."""
    model = SparseFlexVAE("tiny")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for up in model.decoder.upsample:
            up.pruning_head.mlp[2].weight.zero_()
            up.pruning_head.mlp[2].bias.fill_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two meshes prepared at 16^3, their latents under a random tiny VAE, and tiny structure VAE / structure flow /
    SLat flow runs (a few steps each) trained through the command line, plus a pipeline file naming them."""
    root = tmp_path_factory.mktemp("gen")
    meshes = root / "meshes"
    meshes.mkdir()
    trimesh.creation.icosphere(2, radius=0.5).export(meshes / "sphere.obj")
    trimesh.creation.torus(0.35, 0.12).export(meshes / "torus.obj")
    data, latents = root / "data", root / "latents"
    assert main(["data", "prepare", str(meshes), str(data), "--resolution", "16", "--levels", "1", "--views", "2",
                 "--image-size", "64", "--points", "4000", "--val-fraction", "0", "--workers", "1"]) == 0
    save_weights(random_vae(), root / "vae.safetensors")
    assert main(["data", "encode", str(data), "--checkpoint", str(root / "vae.safetensors"), "-o", str(latents),
                 "--device", "cpu"]) == 0
    assert main(["train", "structure-vae", "--data", str(data), "-o", str(root / "svae"), "--steps", "2",
                 "--quiet"]) == 0
    assert main(["train", "structure-flow", "--data", str(data), "-o", str(root / "sflow"), "--steps", "2",
                 "--set", f"flow.structure_vae={root / 'svae' / 'checkpoint.pt'}", "--set",
                 'model_overrides={"resolution": 4}', "--quiet"]) == 0
    assert main(["train", "slat-flow", "--data", str(latents), "-o", str(root / "slat"), "--steps", "2",
                 "--quiet"]) == 0
    assert main(["pipeline", "save", "-o", str(root / "pipe.json"), "--structure-flow",
                 str(root / "sflow" / "checkpoint.pt"), "--slat-flow", str(root / "slat" / "checkpoint.pt")]) == 0
    image = root / "render.png"
    with np.load(data / "items" / "sphere.obj.npz") as z:
        Image.fromarray(z["images"][0]).save(image)
    return root, image


# -- the SLat flow task -----------------------------------------------------------------------------------------------

def slat_config(**kw):
    return load_config("tiny", "slat-flow").override([f"{k}={json.dumps(v)}" for k, v in kw.items()])


def test_slat_task_takes_the_statistics_and_vae_of_its_latents(runs):
    root, _ = runs
    ds = LatentDataset(root / "latents")
    task = SLatFlowTask(slat_config(), ds)
    assert task.config.flow.latent_mean == pytest.approx(ds.stats["mean"])
    assert task.config.flow.vae == str((root / "vae.safetensors").resolve())
    # stored with the checkpoint, and what generation denormalises with
    model, stats, train = load_slat_flow(root / "slat" / "checkpoint.pt")
    assert stats["mean"] == pytest.approx(ds.stats["mean"]) and train["flow"]["vae"] == task.config.flow.vae
    feats = ds[0]["feats"]
    assert torch.allclose(denormalize_latent(normalize_latent(feats, stats), stats), feats, atol=1e-5)
    z = normalize_latent(torch.cat([ds[i]["feats"] for i in range(len(ds))]), stats)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-3


def test_slat_batch_loss_is_the_mean_of_its_items(runs):
    root, _ = runs
    ds = LatentDataset(root / "latents")
    task = SLatFlowTask(slat_config(), ds)
    model = task.build_model()
    with torch.no_grad():  # a non-zero output layer, so the loss depends on the model
        model.final_layer.linear.weight.normal_(0, 0.1)

    def loss(items, seeds):
        batch = task.collate(items)
        batch["seeds"], batch["step"] = seeds, 0
        return task.loss(model, batch)[0].item()

    with torch.no_grad():
        assert loss([ds[0], ds[1]], [5, 6]) == pytest.approx((loss([ds[0]], [5]) + loss([ds[1]], [6])) / 2, rel=1e-5)


def test_slat_training_resumes_bit_for_bit(runs, tmp_path):
    root, _ = runs
    ds = LatentDataset(root / "latents")
    config = slat_config(steps=4, batch_size=1)
    params = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    full = Trainer(SLatFlowTask(config, ds), ds, config, tmp_path / "full", device="cpu", quiet=True)
    full.run()
    first = Trainer(SLatFlowTask(config, ds), ds, config, tmp_path / "split", device="cpu", quiet=True)
    first.run(until=2)
    second = Trainer(SLatFlowTask(config, ds), ds, config, tmp_path / "split", device="cpu", quiet=True, resume=True)
    second.run()
    assert torch.equal(params(second.model), params(full.model))


def _slat_ddp_worker(rank, world, init_file, run_dir, latents, queue):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = LatentDataset(latents)
        config = slat_config(steps=3, batch_size=2, checkpoint_every=0)
        t = Trainer(SLatFlowTask(config, ds), ds, config, run_dir, device="cpu", quiet=True)
        t.run()
        queue.put((rank, torch.cat([p.detach().reshape(-1) for p in t.model.parameters()]).numpy()))
    finally:
        dist.destroy_process_group()


def test_slat_two_process_ddp_equals_one_process_with_the_combined_batch(runs, tmp_path, spawn_ranks):
    root, _ = runs
    got = dict(spawn_ranks(_slat_ddp_worker, str(tmp_path / "init"), str(tmp_path / "ddp"), str(root / "latents")))
    ds = LatentDataset(root / "latents")
    config = slat_config(steps=3, batch_size=2, checkpoint_every=0)
    single = Trainer(SLatFlowTask(config, ds), ds, config, tmp_path / "single", device="cpu", quiet=True)
    params = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    start = params(single.model).clone()
    single.run()
    expected = params(single.model)
    assert (expected - start).abs().max() > 1e-4
    for rank in (0, 1):
        torch.testing.assert_close(torch.from_numpy(got[rank]), expected, rtol=1e-5, atol=1e-6)


# -- pipeline files and generate --------------------------------------------------------------------------------------

def test_pipeline_file_resolves_relative_parts_and_loads(runs):
    root, _ = runs
    doc = json.loads((root / "pipe.json").read_text())
    assert doc["structure_flow"] == "sflow/checkpoint.pt" and doc["vae"] == "vae.safetensors"
    assert doc["structure_vae"] == "svae/checkpoint.pt" and doc["image_encoder"] == "tiny"  # from the runs
    parts = read_pipeline(root / "pipe.json")
    assert parts["slat_flow"] == str(root / "slat" / "checkpoint.pt")
    pipe = ImageTo3DPipeline.from_file(root / "pipe.json")
    assert pipe.resolution == 64  # 16^3 structures, the VAE's 4x upsampling


def test_generate_writes_meshes_pictures_and_a_report_reproducibly(runs, tmp_path, capsys):
    root, image = runs
    pipe = ImageTo3DPipeline.from_file(root / "pipe.json")
    a, b, c = (pipe([str(image)], seed=s, structure_steps=3, slat_steps=3)[0] for s in (1, 1, 2))
    assert torch.equal(a.latent.feats, b.latent.feats) and torch.equal(a.mesh.vertices, b.mesh.vertices)
    assert not torch.equal(a.structure, c.structure) or not torch.equal(a.latent.feats, c.latent.feats)
    assert set(a.seconds) == {"image encoder", "structure", "latent", "decode"}

    out = tmp_path / "out"
    argv = ["generate", str(image), str(image), "-o", str(out), "--checkpoint", str(root / "pipe.json"),
            "--steps", "3", "--seed", "1", "--quiet", "--device", "cpu"]
    capsys.readouterr()
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["mesh"] for s in report["shapes"]] == [str(out / "render.glb"), str(out / "render_2.glb")]
    for name in ("render", "render_2"):
        for ext in (".glb", ".ply", ".png"):
            assert (out / f"{name}{ext}").stat().st_size > 0
    assert report["shapes"][0]["faces"] == len(a.mesh.faces)
    assert set(report["shapes"][0]["seconds"]) >= {"structure", "latent", "decode"}
    assert main(argv) == 2  # nothing is overwritten without --overwrite
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing part", "wrong kind", "not a pipeline", "bad image", "empty structure"])
def test_generate_bad_input_gives_one_line(runs, tmp_path, capsys, case):
    root, image = runs
    pipe = root / "pipe.json"
    doc = json.loads(pipe.read_text())
    if case == "missing part":
        pipe = tmp_path / "p.json"
        pipe.write_text(json.dumps({**doc, **{k: str(root / v) for k, v in doc.items() if k not in ("format",
                                    "image_encoder")}, "slat_flow": str(tmp_path / "gone.pt")}))
    elif case == "wrong kind":
        pipe = tmp_path / "p.json"
        pipe.write_text(json.dumps({**doc, **{k: str(root / v) for k, v in doc.items() if k not in ("format",
                                    "image_encoder")}, "slat_flow": str(root / "sflow" / "checkpoint.pt")}))
    elif case == "not a pipeline":
        pipe = root / "sflow" / "checkpoint.pt"
    elif case == "bad image":
        image = tmp_path / "x.png"
        image.write_bytes(b"not an image")
    argv = ["generate", str(image), "-o", str(tmp_path / "out"), "--checkpoint", str(pipe), "--steps", "2",
            "--quiet", "--device", "cpu"]
    if case == "empty structure":
        # a structure VAE whose decoder scores every voxel below 0 generates nothing
        from sparseflex.pipelines import structure
        original = structure.StructureVAE.decode
        structure.StructureVAE.decode = lambda self, z: original(self, z) * 0 - 1
        try:
            code = main(argv)
        finally:
            structure.StructureVAE.decode = original
    else:
        code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "out").exists()
    if case == "empty structure":
        assert "generated structure is empty" in err[0]


def test_pipeline_save_refuses_wrong_parts(runs, tmp_path, capsys):
    root, _ = runs
    argv = ["pipeline", "save", "-o", str(tmp_path / "p.json"), "--structure-flow",
            str(root / "slat" / "checkpoint.pt"), "--slat-flow", str(root / "slat" / "checkpoint.pt")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a slat-flow checkpoint, but a structure-flow checkpoint is needed" in err[0]
    assert not (tmp_path / "p.json").exists()
    with pytest.raises(InputError, match="names no vae"):
        bad = tmp_path / "q.json"
        bad.write_text(json.dumps({"format": "sparseflex-pipeline-1", "image_encoder": "tiny",
                                   "structure_flow": str(root / "sflow" / "checkpoint.pt"),
                                   "structure_vae": str(root / "svae" / "checkpoint.pt"),
                                   "slat_flow": str(root / "slat" / "checkpoint.pt")}))
        read_pipeline(bad)

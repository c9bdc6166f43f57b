"""Image-to-3D end to end at CPU size: every part trained on two real shapes (the SparseFlex VAE, the structure VAE and
flow, the latents and the SLat flow), then (1) the SLat flow regenerates each shape's latent on its true structure and
(2) `generate` turns a render of each shape into that shape, measured against the VAE's own reconstruction."""

import shutil

import numpy as np
import pytest
import torch

from sparseflex.cli import main
from sparseflex.data.dataset import PreparedDataset
from sparseflex.data.latents import LatentDataset, denormalize_latent
from sparseflex.data.mesh import Mesh
from sparseflex.eval.metrics import mesh_metrics
from sparseflex.models import load_model
from sparseflex.models.image_encoder import image_tokens
from sparseflex.nn import SparseTensor
from sparseflex.pipelines.generate import ImageTo3DPipeline
from sparseflex.pipelines.reconstruct import Latent, decode_latent
from sparseflex.pipelines.samplers import euler_sample, gaussian_noise, guided_velocity

MESHES = ["closed/ajc_spot.obj", "open/ddg_hemisphere.obj"]
TINY8 = '{"latent_resolution": 8, "upsample_channels": [32, 16], "norm_groups": 8}'

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_meshes):
    """Two shapes prepared at latent 8^3 (output 32^3); each model trained on them through the command line."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("i23d")
    meshes = root / "meshes"
    meshes.mkdir()
    for name in MESHES:
        shutil.copy(shared_meshes / name, meshes / name.split("/")[1])
    data, latents = root / "data", root / "latents"
    run = lambda *argv: main([str(a) for a in argv])  # noqa: E731
    assert run("data", "prepare", meshes, data, "--resolution", 8, "--levels", 2, "--views", 2, "--image-size", 98,
               "--points", 20000, "--val-fraction", 0, "--workers", 1) == 0
    assert run("train", "vae", "--data", data, "-o", root / "vae", "--steps", 400, "--batch-size", 2,
               "--image-size", 48, "--views-per-item", 1, "--quiet", "--set", f"model_overrides={TINY8}",
               "--set", "lr=2e-3", "--set", "warmup_steps=20", "--set", "ema_decay=0", "--set",
               "checkpoint_every=0") == 0
    assert run("data", "encode", data, "--checkpoint", root / "vae" / "checkpoint.pt", "-o", latents,
               "--device", "cpu") == 0
    assert run("train", "structure-vae", "--data", data, "-o", root / "svae", "--steps", 300, "--batch-size", 2,
               "--quiet", "--set", "model_overrides={\"resolution\": 8}", "--set", "checkpoint_every=0") == 0
    assert run("train", "structure-flow", "--data", data, "-o", root / "sflow", "--steps", 300, "--batch-size", 2,
               "--quiet", "--set", f"flow.structure_vae={root / 'svae' / 'checkpoint.pt'}", "--set",
               "model_overrides={\"resolution\": 2}", "--set", "checkpoint_every=0") == 0
    assert run("train", "slat-flow", "--data", latents, "-o", root / "slat", "--steps", 1200, "--batch-size", 2,
               "--quiet", "--set", "checkpoint_every=0") == 0
    assert run("pipeline", "save", "-o", root / "generator.json", "--structure-flow", root / "sflow" / "checkpoint.pt",
               "--slat-flow", root / "slat" / "checkpoint.pt") == 0
    pipe = ImageTo3DPipeline.from_file(root / "generator.json")
    items = PreparedDataset(data, split="all", with_images=True)
    latent_items = {it["name"]: it for it in LatentDataset(latents, split="all")}
    shapes = []
    vae = load_model(root / "vae" / "checkpoint.pt")
    for item in items:
        gt = Mesh(item["vertices"], item["faces"])
        true = latent_items[item["name"]]
        recon = decode_latent(vae, Latent(true["coords"], true["feats"], true["resolution"])).mesh
        shapes.append({"name": item["name"], "gt": gt, "image": item["images"][0].numpy(), "latent": true,
                       "recon_f": mesh_metrics(recon, gt, num_points=20_000, ceiling=False)["fscore@0.01"]})
    return pipe, shapes


def fscore(mesh, gt):
    if len(mesh.faces) == 0:
        return 0.0
    return mesh_metrics(mesh, gt, num_points=20_000, ceiling=False)["fscore@0.01"]


def test_slat_flow_regenerates_each_latent_on_its_true_structure(trained):
    pipe, shapes = trained
    for s in shapes:
        assert s["recon_f"] >= 60, s  # the VAE itself reproduces the shape: the bar is meaningful
        coords = s["latent"]["coords"]
        cond = image_tokens(pipe.structure.image_encoder, [s["image"]])
        noise = SparseTensor(torch.cat([coords.new_zeros(len(coords), 1), coords], 1),
                             gaussian_noise((len(coords), 8), 0), 1)
        z = euler_sample(guided_velocity(pipe.slat_flow, cond), noise, 25)
        latent = Latent(coords, denormalize_latent(z.feats, pipe.stats), s["latent"]["resolution"])
        got = fscore(decode_latent(pipe.vae, latent).mesh, s["gt"])
        print(f"{s['name']}: regenerated latent F@0.01 {got:.1f} %, true latent {s['recon_f']:.1f} %")
        assert got >= s["recon_f"] - 5


def test_generate_from_a_render_gives_the_shape(trained):
    pipe, shapes = trained
    for s in shapes:
        a = pipe([s["image"]], seed=0, structure_steps=25, slat_steps=25)[0]
        b = pipe([s["image"]], seed=0, structure_steps=25, slat_steps=25)[0]
        c = pipe([s["image"]], seed=1, structure_steps=25, slat_steps=25)[0]
        assert torch.equal(a.mesh.vertices, b.mesh.vertices) and torch.equal(a.mesh.faces, b.mesh.faces)
        assert not torch.equal(a.latent.feats, c.latent.feats) or not torch.equal(a.structure, c.structure)
        got = fscore(a.mesh, s["gt"])
        others = [fscore(a.mesh, o["gt"]) for o in shapes if o is not s]
        print(f"{s['name']}: generated F@0.01 {got:.1f} % (VAE reconstruction {s['recon_f']:.1f} %; against the "
              f"other shape {np.round(others, 1).tolist()})")
        assert got >= 0.8 * s["recon_f"]

"""Image -> structure (issue: image-to-3D part 1): the structure VAE and structure flow training tasks on the Trainer
(batch = mean of items, 2-process DDP, exact resume), the structure pipeline and `sparseflex sample-structure`, and a
structure flow overfitted on three shapes that follows the image it is given."""

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import trimesh
from PIL import Image

from sparseflex.cli import main
from sparseflex.data.mesh import Mesh, load_mesh, normalize
from sparseflex.data.prepare import conditioning_views, shaded_images
from sparseflex.data.sampling import sample_surface
from sparseflex.data.voxelize import active_voxels
from sparseflex.models.structure_vae import iou, occupancy_grid
from sparseflex.pipelines.structure import StructurePipeline, load_structure_vae
from sparseflex.train.config import load_config
from sparseflex.train.generation_tasks import StructureFlowTask, StructureVAETask, structure_grids
from sparseflex.train.trainer import Trainer

S = 16  # structure resolution of the tests: the tiny structure VAE's latent is 4^3

pytestmark = pytest.mark.usefixtures("one_thread")


def make_item(mesh: Mesh, name: str, seed: int, views: int = 2) -> dict:
    """What a prepared item holds for these tasks: the latent voxels at S and conditioning renders."""
    normed, _ = normalize(mesh)
    gen = torch.Generator().manual_seed(seed)
    points, _, _ = sample_surface(normed, 20_000, generator=gen)
    cams = conditioning_views(normed, views, gen, size=98)
    return {"name": name, "coords": active_voxels(normed, points, S, 0.25), "resolution": S,
            "images": torch.from_numpy(shaded_images(normed, cams))}


def analytic_items() -> list[dict]:
    shapes = [trimesh.creation.icosphere(2), trimesh.creation.box((1.0, 0.4, 0.7)),
              trimesh.creation.torus(0.35, 0.12)]
    return [make_item(Mesh.from_trimesh(m), f"shape{i}", i) for i, m in enumerate(shapes)]


def vae_config(**kw):
    return load_config("tiny", "structure-vae").override([f"{k}={json.dumps(v)}" for k, v in kw.items()])


def flow_config(structure_vae, **kw):
    over = {"flow.structure_vae": str(structure_vae), "model_overrides": {"resolution": S // 4}, **kw}
    return load_config("tiny", "structure-flow").override([f"{k}={json.dumps(v)}" for k, v in over.items()])


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def items():
    return analytic_items()


@pytest.fixture(scope="module")
def structure_vae_ckpt(tmp_path_factory, items):
    """A briefly trained tiny structure VAE (what the flow task needs to exist)."""
    run = tmp_path_factory.mktemp("svae")
    config = vae_config(steps=3, batch_size=3, checkpoint_every=0)
    Trainer(StructureVAETask(config), items, config, run, device="cpu", quiet=True).run()
    return run / "checkpoint.pt"


# -- tasks ------------------------------------------------------------------------------------------------------------

def _loss(task, model, its, seeds):
    batch = task.collate(its)
    batch["seeds"], batch["step"] = seeds, 0
    return task.loss(model, batch)


@pytest.mark.parametrize("kind", ["structure-vae", "structure-flow"])
def test_batch_loss_is_the_mean_of_its_items(kind, items, structure_vae_ckpt):
    """What makes DDP over ranks equal one process: an item's loss depends on the item and its seed only."""
    task = StructureVAETask(vae_config()) if kind == "structure-vae" else StructureFlowTask(flow_config(
        structure_vae_ckpt))
    model = task.build_model()
    with torch.no_grad():
        both, parts = _loss(task, model, items[:2], [11, 12])
        a, pa = _loss(task, model, items[:1], [11])
        b, pb = _loss(task, model, items[1:2], [12])
    assert both.item() == pytest.approx((a.item() + b.item()) / 2, rel=1e-5)
    for k in parts:
        assert parts[k].item() == pytest.approx((pa[k].item() + pb[k].item()) / 2, rel=1e-5), k


def test_structure_vae_loss_is_dice_plus_kl(items):
    task = StructureVAETask(vae_config())
    model = task.build_model()
    with torch.no_grad():
        total, parts = _loss(task, model, items[:1], [3])
    assert set(parts) == {"dice", "kl"}
    assert total.item() == pytest.approx(parts["dice"].item() + 1e-3 * parts["kl"].item(), rel=1e-5)
    assert 0 < parts["dice"].item() < 1


def test_flow_task_needs_its_structure_vae_and_matching_sizes(tmp_path, structure_vae_ckpt):
    from sparseflex.errors import InputError, OptionError
    with pytest.raises(OptionError, match="flow.structure_vae"):
        StructureFlowTask(load_config("tiny", "structure-flow"))
    with pytest.raises(InputError, match="no such checkpoint"):
        StructureFlowTask(flow_config(tmp_path / "missing.pt"))
    with pytest.raises(OptionError, match="cond_channels"):
        StructureFlowTask(flow_config(structure_vae_ckpt, model_overrides={"cond_channels": 32})).build_model()


def _ddp_worker(rank, world, init_file, run_dir, ckpt, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = flow_config(ckpt, steps=3, batch_size=2, checkpoint_every=0)
        t = Trainer(StructureFlowTask(config), analytic_items(), config, run_dir, device="cpu", quiet=True)
        t.run()
        queue.put((rank, params(t.model).numpy()))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_equals_one_process(tmp_path, items, structure_vae_ckpt, spawn_ranks):
    got = dict(spawn_ranks(_ddp_worker, str(tmp_path / "init"), str(tmp_path / "ddp"), str(structure_vae_ckpt)))
    config = flow_config(structure_vae_ckpt, steps=3, batch_size=2, checkpoint_every=0)
    single = Trainer(StructureFlowTask(config), items, config, tmp_path / "single", device="cpu", quiet=True)
    start = params(single.model).clone()
    single.run()
    expected = params(single.model)
    assert (expected - start).abs().max() > 1e-4
    for rank in (0, 1):
        torch.testing.assert_close(torch.from_numpy(got[rank]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["structure-vae", "structure-flow"])
def test_training_resumes_bit_for_bit(kind, tmp_path, items, structure_vae_ckpt):
    make = StructureVAETask if kind == "structure-vae" else StructureFlowTask
    config = (vae_config(steps=4, batch_size=2) if kind == "structure-vae"
              else flow_config(structure_vae_ckpt, steps=4, batch_size=2))
    full = Trainer(make(config), items, config, tmp_path / "full", device="cpu", quiet=True)
    full.run()
    first = Trainer(make(config), items, config, tmp_path / "split", device="cpu", quiet=True)
    first.run(until=2)
    torch.manual_seed(123)
    second = Trainer(make(config), items, config, tmp_path / "split", device="cpu", quiet=True, resume=True)
    second.run()
    assert torch.equal(params(second.model), params(full.model))
    assert [r["loss"] for r in second.history()] == [r["loss"] for r in full.history()]


# -- the generator follows the image ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_overfitted_structure_flow_generates_the_shape_of_the_image(tmp_path, shared_meshes):
    """Three shapes, two renders each: the structure VAE then the flow overfit them; sampling from a render of each
    gives that shape's structure (IoU >= 0.8), not another's (the condition matters)."""
    names = ["closed/ajc_spot.obj", "closed/ddg_double-torus.obj", "open/ddg_hemisphere.obj"]
    shapes = [make_item(load_mesh(shared_meshes / n), n, i) for i, n in enumerate(names)]
    config = vae_config(steps=400, batch_size=3, lr=3e-3, warmup_steps=10, checkpoint_every=0)
    Trainer(StructureVAETask(config), shapes, config, tmp_path / "svae", device="cpu", quiet=True).run()
    vae = load_structure_vae(tmp_path / "svae" / "checkpoint.pt")
    grid, _ = structure_grids(shapes)
    with torch.no_grad():
        recon = iou(vae.decode(vae.encode(grid)[0]) > 0, grid)
    assert (recon >= 0.8).all(), recon  # the ceiling of what the flow can reach

    config = flow_config(tmp_path / "svae" / "checkpoint.pt", steps=400, batch_size=3, lr=1e-3, warmup_steps=10,
                         checkpoint_every=0)
    Trainer(StructureFlowTask(config), shapes, config, tmp_path / "sflow", device="cpu", quiet=True).run()
    pipe = StructurePipeline.from_checkpoint(tmp_path / "sflow" / "checkpoint.pt")
    scores = torch.zeros(3, 3)
    for i, shape in enumerate(shapes):
        result = pipe([shape["images"][0].numpy()], seed=0, steps=25)[0]
        pred = occupancy_grid(result.coords, S, 1) > 0
        scores[i] = torch.stack([iou(pred, grid[j:j + 1])[0] for j in range(3)])
    print("IoU (rows: image of shape i; columns: against shape j)\n", scores)
    assert (scores.diagonal() >= 0.8).all()
    assert (scores.diagonal() > scores.masked_fill(torch.eye(3, dtype=torch.bool), 0).amax(1) + 0.3).all()


# -- command line -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """A prepared folder of two meshes and tiny structure VAE / flow runs trained on it through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    meshes = root / "meshes"
    meshes.mkdir()
    trimesh.creation.icosphere(2).export(meshes / "sphere.obj")
    trimesh.creation.box((1.0, 0.5, 0.7)).export(meshes / "box.obj")
    data = root / "data"
    assert main(["data", "prepare", str(meshes), str(data), "--resolution", "16", "--levels", "1", "--views", "2",
                 "--image-size", "64", "--points", "4000", "--val-fraction", "0", "--workers", "1"]) == 0
    assert main(["train", "structure-vae", "--data", str(data), "-o", str(root / "svae"), "--steps", "2",
                 "--quiet"]) == 0
    assert main(["train", "structure-flow", "--data", str(data), "-o", str(root / "sflow"), "--steps", "2",
                 "--set", f"flow.structure_vae={root / 'svae' / 'checkpoint.pt'}", "--set",
                 'model_overrides={"resolution": 4}', "--quiet"]) == 0
    image = root / "render.png"
    with np.load(data / "items" / "sphere.obj.npz") as z:
        Image.fromarray(z["images"][0]).save(image)
    return root, image


def test_sample_structure_writes_cubes_and_a_picture(trained_runs, tmp_path, capsys):
    root, image = trained_runs
    capsys.readouterr()
    out = tmp_path / "s.ply"
    code = main(["sample-structure", str(image), "-o", str(out), "--checkpoint", str(root / "sflow" / "checkpoint.pt"),
                 "--steps", "3", "--seed", "1", "--quiet"])
    captured = capsys.readouterr()
    if code == 2:  # an untrained flow may generate nothing: then the one-line message, and nothing written
        assert captured.err.strip().startswith("error: the generated structure is empty") and not out.exists()
        return
    report = json.loads(captured.out)
    assert code == 0 and report["resolution"] == 16 and report["voxels"] > 0
    mesh = load_mesh(out).to_trimesh()  # the voxels' boundary: closed, enclosing exactly their volume
    edges, uses = np.unique(np.sort(mesh.edges, axis=1), axis=0, return_counts=True)
    assert (uses % 2 == 0).all()
    assert mesh.volume == pytest.approx(report["voxels"] / 16 ** 3, rel=1e-6)
    assert Image.open(tmp_path / "s.png").size[0] > 256


def test_structure_pipeline_is_reproducible_per_seed(trained_runs):
    root, image = trained_runs
    pipe = StructurePipeline.from_checkpoint(root / "sflow" / "checkpoint.pt")
    a, b, c = (pipe([str(image)], seed=s, steps=3)[0] for s in (5, 5, 6))
    assert torch.equal(a.latent, b.latent) and not torch.equal(a.latent, c.latent)


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "vae as flow", "flow as structure vae",
                                  "busy photo", "resume other task", "train on a flow as structure vae"])
def test_bad_input_gives_one_line(trained_runs, tmp_path, capsys, case):
    root, image = trained_runs
    flow, svae = root / "sflow" / "checkpoint.pt", root / "svae" / "checkpoint.pt"
    out = tmp_path / "s.ply"
    argv = ["sample-structure", str(image), "-o", str(out), "--checkpoint", str(flow), "--steps", "2", "--quiet"]
    if case == "missing image":
        argv[1] = str(tmp_path / "nope.png")
    elif case == "corrupt image":
        bad = tmp_path / "bad.png"
        bad.write_bytes(image.read_bytes()[:200])
        argv[1] = str(bad)
    elif case == "vae as flow":
        argv[5] = str(svae)
    elif case == "flow as structure vae":
        argv += ["--structure-vae", str(flow)]
    elif case == "busy photo":
        busy = tmp_path / "busy.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(busy)
        argv[1] = str(busy)
    elif case == "resume other task":
        argv = ["train", "structure-flow", "--data", str(root / "data"), "-o", str(root / "svae"), "--resume"]
    else:
        argv = ["train", "structure-flow", "--data", str(root / "data"), "-o", str(tmp_path / "run"), "--steps", "1",
                "--set", f"flow.structure_vae={flow}", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists() and not out.with_suffix(".png").exists() and not (tmp_path / "run").exists()

"""Checkpoints load with ``weights_only=True``: a crafted file is refused by every loader and CLI command without
running anything; what we save loads that way; old checkpoints of ours are converted by
``sparseflex checkpoint upgrade --trust`` and then resume exactly."""

import random
from dataclasses import asdict

import numpy as np
import pytest
import torch
import trimesh
from torch import nn

from sparseflex.cli import main
from sparseflex.data.mesh import Mesh, normalize, save_mesh
from sparseflex.errors import SparseFlexError
from sparseflex.fit import fitter as fitter_mod
from sparseflex.fit.fitter import FitConfig, Fitter, save_checkpoint
from sparseflex.io import to_plain
from sparseflex.models import load_model, read_checkpoint
from sparseflex.pipelines.reconstruct import Latent, save_latent
from sparseflex.train import trainer as trainer_mod
from sparseflex.train.config import TrainConfig
from sparseflex.train.trainer import Trainer


class PlantsAFile:
    """Unpickling this calls ``open(marker, "w")``: a file appears if a loader runs what a checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_checkpoint(path, marker, fmt):
    """A file with the right "format" keys (so it would otherwise pass) and a payload that creates ``marker``."""
    evil = PlantsAFile(marker)
    payload = {"format": fmt, "config": {}, "model_config": None, "model": {"w": evil}, "ema": {"w": evil},
               "sparseflex": evil, "rng": [evil], "step": 0, "epoch": 0, "data_position": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def assert_refused(message, marker):
    assert "not a safe checkpoint" in message, message
    assert "\n" not in message.strip()
    assert "upgrade" not in message  # a crafted file is never offered the trusted conversion
    assert not marker.exists(), "the checkpoint's payload ran"


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "planted.txt"


# -- every loader refuses a crafted file ------------------------------------------------------------------------------
def test_read_checkpoint_and_load_model_refuse_a_crafted_file(tmp_path, marker):
    path = evil_checkpoint(tmp_path / "evil.pt", marker, "sparseflex-train-1")
    for load in (read_checkpoint, lambda p: load_model(p, config="tiny")):
        with pytest.raises(SparseFlexError) as err:
            load(path)
        assert_refused(str(err.value), marker)


def test_trainer_load_checkpoint_and_resume_refuse_a_crafted_file(tmp_path, marker):
    path = evil_checkpoint(tmp_path / "run" / "checkpoint.pt", marker, "sparseflex-train-1")
    with pytest.raises(SparseFlexError) as err:
        trainer_mod.load_checkpoint(path)
    assert_refused(str(err.value), marker)
    with pytest.raises(SparseFlexError) as err:
        Trainer(ToyTask(), toy_data(), toy_config(), tmp_path / "run", device="cpu", quiet=True, resume=True)
    assert_refused(str(err.value), marker)


def test_fitter_load_checkpoint_refuses_a_crafted_file(tmp_path, marker):
    path = evil_checkpoint(tmp_path / "ck.pt", marker, "sparseflex-fit-1")
    with pytest.raises(SparseFlexError) as err:
        fitter_mod.load_checkpoint(path)
    assert_refused(str(err.value), marker)


@pytest.fixture
def sphere_file(tmp_path):
    path = tmp_path / "sphere.obj"
    save_mesh(path, Mesh.from_trimesh(trimesh.creation.icosphere(2, radius=0.5)))
    return path


@pytest.mark.parametrize("command", ["reconstruct", "encode", "decode", "fit", "train"])
def test_cli_refuses_a_crafted_checkpoint(tmp_path, marker, sphere_file, capsys, command):
    evil = tmp_path / "evil.pt"
    if command in ("reconstruct", "encode"):
        evil_checkpoint(evil, marker, "sparseflex-train-1")
        out = tmp_path / ("out.ply" if command == "reconstruct" else "latent.safetensors")
        argv = [command, str(sphere_file), "-o", str(out), "--checkpoint", str(evil), "--device", "cpu"]
    elif command == "decode":
        evil_checkpoint(evil, marker, "sparseflex-train-1")
        latent = save_latent(tmp_path / "latent.safetensors",
                             Latent(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 8), 8))
        argv = ["decode", str(latent), "-o", str(tmp_path / "out.ply"), "--checkpoint", str(evil), "--device", "cpu"]
    elif command == "fit":
        evil_checkpoint(tmp_path / "fit" / "checkpoint.pt", marker, "sparseflex-fit-1")
        argv = ["fit", str(sphere_file), "-o", str(tmp_path / "fit"), "--resume", "--quiet"]
    else:
        evil_checkpoint(tmp_path / "run" / "checkpoint.pt", marker, "sparseflex-train-1")
        (tmp_path / "data").mkdir()
        argv = ["train", "vae", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "run"), "--resume", "--quiet",
                "--device", "cpu"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert_refused(err[0], marker)


# -- what we save loads with weights_only=True ------------------------------------------------------------------------
class ToyTask:
    """A small MLP on noisy regression; each item's noise comes from its seed, and the loss also draws from Python's
    and numpy's global generators, so resuming must restore those exactly."""

    def build_model(self):
        return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 2))

    @staticmethod
    def collate(items):
        return {"x": torch.stack([it["x"] for it in items]), "y": torch.stack([it["y"] for it in items])}

    def loss(self, model, batch):
        noise = torch.stack([torch.randn(6, generator=torch.Generator().manual_seed(s)) for s in batch["seeds"]])
        scale = 0.1 + 0.01 * random.random() + 0.01 * float(np.random.rand())  # the global generators' states matter
        pred = model(batch["x"] + scale * noise)
        err = ((pred - batch["y"]) ** 2).mean(1)
        return err.mean(), {"mse": err.mean()}


def toy_data(n=12):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 2, generator=g)
    return [{"x": x[i], "y": torch.sin(x[i] @ w)} for i in range(n)]


def toy_config(**kw):
    base = dict(task="toy", batch_size=4, steps=6, lr=1e-2, warmup_steps=2, clip=0.5, ema_decay=0.9,
                checkpoint_every=0, seed=7)
    return TrainConfig(**{**base, **kw}).validate()


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_plain(value, where="payload"):
    """Only dicts, lists, tuples, numbers, strings, bools, None and tensors (no numpy anywhere)."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert_plain(k, f"{where} key")
            assert_plain(v, f"{where}[{k!r}]")
    elif type(value) in (list, tuple):
        for i, v in enumerate(value):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert type(value) in (torch.Tensor, str, int, float, bool, type(None), torch.Size, torch.dtype), \
            f"{where}: {type(value)}"


def test_trainer_checkpoint_loads_with_weights_only(tmp_path):
    Trainer(ToyTask(), toy_data(), toy_config(steps=2), tmp_path, device="cpu", quiet=True).run()
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert payload["format"] == "sparseflex-train-1"
    assert_plain(payload)
    state = payload["rng"][0]
    assert state["numpy"][1].dtype == torch.int64 and len(state["numpy"][1]) == 624
    assert isinstance(state["python"][1], list)


def small_fit(tmp_path):
    gt = normalize(Mesh.from_trimesh(trimesh.creation.icosphere(3, radius=0.4)))[0]
    cfg = FitConfig(resolution=16, iterations=4, image_size=64, checkpoint_every=2)
    return gt, cfg


def test_fit_checkpoint_loads_with_weights_only(tmp_path):
    gt, cfg = small_fit(tmp_path)
    fitter = Fitter(gt, cfg)
    fitter.run()
    state, sf = fitter.snapshot(), fitter.state.sf
    # the previous saver already wrote tensors and plain values only: its files still load without conversion
    torch.save({"format": "sparseflex-fit-1", "config": asdict(cfg),
                "sparseflex": {"coords": sf.coords, "resolution": sf.resolution, "corners": sf.corners,
                               "voxel_corners": sf.voxel_corners,
                               **{k: getattr(sf, k).detach() for k in fitter_mod.PARAMS}},
                "stage": state.stage, "step": state.step, "history": state.history, "timing": state.timing,
                "optimizer": state.optimizer_state, "rng": state.rng_state, "pinned": state.pinned},
               tmp_path / "old.pt")
    loaded, cfg2 = fitter_mod.load_checkpoint(tmp_path / "old.pt")
    assert loaded.step == state.step and loaded.history == state.history and cfg2 == cfg

    history = list(state.history)
    state.history[0] = (np.int64(0),) + tuple(state.history[0][1:3]) + (np.float64(0.5), {"a": np.float32(1.0)})
    state.timing["extract"] = np.float64(state.timing["extract"])  # numpy numbers are written as Python numbers
    save_checkpoint(tmp_path / "ck.pt", state, cfg)
    payload = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert payload["format"] == "sparseflex-fit-1"
    assert_plain(payload)
    assert payload["history"][0][3] == 0.5 and type(payload["history"][0][3]) is float
    assert payload["history"][1:] == history[1:]
    loaded, cfg2 = fitter_mod.load_checkpoint(tmp_path / "ck.pt")
    assert cfg2 == cfg and loaded.step == 4 and torch.equal(loaded.rng_state, state.rng_state)


def test_to_plain_refuses_what_would_not_load_safely():
    assert to_plain({"a": (np.float64(1.5), [np.int32(2)])}) == {"a": (1.5, [2])}
    for bad in (np.zeros(3), FitConfig(), object()):
        with pytest.raises(TypeError, match="checkpoint"):
            to_plain({"x": [bad]})


# -- old checkpoints of ours ------------------------------------------------------------------------------------------
def make_old_format(path):
    """Rewrite a checkpoint the way the previous code saved it: Python's random state as its tuple and numpy's as
    ``np.random.get_state()`` (with a numpy array), which ``weights_only`` loading refuses."""
    payload = torch.load(path, weights_only=True)
    for state in payload["rng"]:
        version, internal, gauss = state["python"]
        state["python"] = (version, tuple(internal), gauss)
        name, keys, pos, has_gauss, cached = state["numpy"]
        state["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    torch.save(payload, path)


def test_old_training_checkpoint_is_refused_then_upgraded_and_resumes_bit_for_bit(tmp_path, capsys):
    n = 5
    random.seed(1)
    np.random.seed(1)
    full = Trainer(ToyTask(), toy_data(), toy_config(steps=2 * n), tmp_path / "full", device="cpu", quiet=True)
    full.run()
    random.seed(1)
    np.random.seed(1)
    first = Trainer(ToyTask(), toy_data(), toy_config(steps=2 * n), tmp_path / "split", device="cpu", quiet=True)
    first.run(until=n)
    ckpt = tmp_path / "split" / "checkpoint.pt"
    make_old_format(ckpt)

    for load in (lambda: trainer_mod.load_checkpoint(ckpt), lambda: read_checkpoint(ckpt)):
        with pytest.raises(SparseFlexError) as err:
            load()
        message = str(err.value)
        assert "sparseflex checkpoint upgrade" in message and "--trust" in message and "\n" not in message
    capsys.readouterr()
    (tmp_path / "data").mkdir()
    assert main(["train", "vae", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "split"), "--resume",
                 "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparseflex checkpoint upgrade" in err[0]

    new = tmp_path / "new.pt"
    assert main(["checkpoint", "upgrade", str(ckpt), str(new)]) == 2  # no --trust: refused, nothing read
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust" in err[0] and not new.exists()
    assert main(["checkpoint", "upgrade", str(ckpt), str(new), "--trust"]) == 0
    assert_plain(torch.load(new, weights_only=True))
    assert main(["checkpoint", "upgrade", str(ckpt), str(new), "--trust"]) == 2  # NEW exists: no overwrite
    assert "--overwrite" in capsys.readouterr().err
    # in place, as the refusal suggests
    assert main(["checkpoint", "upgrade", str(ckpt), str(ckpt), "--trust", "--overwrite"]) == 0
    assert torch.load(ckpt, weights_only=True)["step"] == n

    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    second = Trainer(ToyTask(), toy_data(), toy_config(steps=2 * n), tmp_path / "split", device="cpu", quiet=True,
                     resume=True)
    second.run()
    assert torch.equal(params(second.model), params(full.model))
    for k, v in full.ema.state_dict().items():
        assert torch.equal(second.ema.state_dict()[k], v)


def test_upgrade_refuses_what_is_not_ours(tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"weights": np.zeros(2)}, other)
    assert main(["checkpoint", "upgrade", str(other), str(tmp_path / "new.pt"), "--trust"]) == 2
    assert "not a SparseFlex checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "new.pt").exists()


def test_upgrade_with_trust_still_runs_no_code_from_the_file(tmp_path, capsys):
    from sparseflex.cli import main
    marker = tmp_path / "planted"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker, "sparseflex-train-1")
    assert main(["checkpoint", "upgrade", str(evil), str(tmp_path / "new.pt"), "--trust"]) == 2
    assert not marker.exists() and not (tmp_path / "new.pt").exists()
    assert capsys.readouterr().err.count("\n") == 1

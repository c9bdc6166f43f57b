"""VAE weights on disk: release-layout safetensors, our files and training checkpoints; strict checks and one-line
errors; sparse convolution weights from a file against torch's dense Conv3d."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sparseflex.errors import InputError
from sparseflex.models import (SparseFlexVAE, get_config, load_model, load_weights, point_inputs,
                               save_weights)
from sparseflex.nn import SparseTensor
from sparseflex.sparse import dense_grid

KEYS_TSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "triposf_vae_keys.tsv"


pytestmark = pytest.mark.usefixtures("one_thread")


def random_state(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in model.state_dict().items()}


@pytest.fixture
def tiny_file(tmp_path):
    """A tiny model with random weights everywhere, saved as plain (release-style) safetensors without metadata."""
    model = SparseFlexVAE("tiny")
    state = random_state(model)
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    return path, state


def published_shapes():
    if not KEYS_TSV.is_file():
        pytest.skip(f"{KEYS_TSV} not found")
    rows = [line.split("\t") for line in KEYS_TSV.read_text().strip().splitlines()]
    return {k: [int(s) for s in shape.strip("[]").split(",")] for k, shape in rows}


def test_release_key_list_maps_onto_the_triposf_model_on_meta():
    """The whole published key list goes through the strict mapping (meta tensors: no memory)."""
    shapes = published_shapes()
    with torch.device("meta"):
        model = SparseFlexVAE("triposf")
        state = {k: torch.empty(s) for k, s in shapes.items()}
    load_weights(model, state, "release")  # every key and shape accepted
    # and the checks bite: one key short, one shape off, one key extra
    with pytest.raises(InputError, match=r"1 missing keys \(decoder.out_layer.bias\)"):
        load_weights(model, {k: v for k, v in state.items() if k != "decoder.out_layer.bias"}, "release")
    with torch.device("meta"):
        bad = dict(state, **{"decoder.upsample.1.out_layers.0.conv.weight": torch.empty(96, 3, 3, 3, 96)})
        extra = dict(state, **{"decoder.extra.weight": torch.empty(3)})
    with pytest.raises(InputError, match=r"decoder.upsample.1.out_layers.0.conv.weight has shape \[96, 3, 3, 3, 96\] "
                                         r"but the model needs \[96, 3, 3, 3, 192\]"):
        load_weights(model, bad, "release")
    with pytest.raises(InputError, match="1 unexpected keys"):
        load_weights(model, extra, "release")


def test_safetensors_round_trip_gives_the_same_model(tiny_file, tmp_path):
    path, state = tiny_file
    model = load_model(path, config="tiny")
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    # our own files carry the config: no name needed to load them back
    ours = save_weights(model, tmp_path / "ours.safetensors")
    again = load_model(ours)
    assert again.config == get_config("tiny")
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
    # load_state into an existing model
    fresh = SparseFlexVAE("tiny").load_state(ours)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_training_checkpoint_prefers_ema_weights(tmp_path):
    model = SparseFlexVAE("small")
    raw, ema = random_state(model, 1), random_state(model, 2)
    path = tmp_path / "train.pt"
    torch.save({"format": "sparseflex-train-1", "model_config": model.config.to_dict(), "model": raw, "ema": ema,
                "step": 10}, path)
    loaded = load_model(path)
    assert loaded.config == get_config("small")
    assert all(torch.equal(v, ema[k]) for k, v in loaded.state_dict().items())
    # without EMA, the model weights; a DistributedDataParallel prefix is dropped
    torch.save({"format": "sparseflex-train-1", "model_config": model.config.to_dict(),
                "model": {f"module.{k}": v for k, v in raw.items()}}, path)
    assert all(torch.equal(v, raw[k]) for k, v in load_model(path).state_dict().items())


def test_from_triposf_refuses_other_weights(tiny_file):
    path, _ = tiny_file
    with pytest.raises(InputError, match=r"tiny.safetensors: weights do not match the model: \d+ missing keys") as err:
        SparseFlexVAE.from_triposf(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "garbage", "pickle", "nan"])
def test_bad_files_give_one_line_errors(tiny_file, tmp_path, damage):
    path, state = tiny_file
    bad = tmp_path / "bad.safetensors"
    data = path.read_bytes()
    expected = {"missing": "no such checkpoint file", "empty": "checkpoint file is empty",
                "truncated": "truncated or corrupt safetensors", "garbage": "truncated or corrupt safetensors",
                "pickle": "not a SparseFlex VAE checkpoint", "nan": "not finite"}[damage]
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00\x01garbage" * 100)
    elif damage == "pickle":
        bad = tmp_path / "other.pt"
        torch.save({"weights": 1}, bad)
    elif damage == "nan":
        save_file(dict(state, **{"decoder.out_layer.bias": torch.full((53,), float("nan"))}), str(bad))
    with pytest.raises(InputError, match=expected) as err:
        load_model(bad, config="tiny")
    assert "\n" not in str(err.value)


def test_checkpoint_conv_weights_equal_dense_conv3d(tiny_file):
    """Kernel [out, kx, ky, kz, in] from the file, applied by the sparse conv, equals Conv3d on the dense grid."""
    path, _ = tiny_file
    model = load_model(path, config="tiny")
    file_state = load_file(str(path))
    res = 6
    gen = torch.Generator().manual_seed(0)
    coords = dense_grid(res)
    coords = coords[torch.rand(len(coords), generator=gen) < 0.4]
    for name in ("decoder.upsample.0.out_layers.0", "decoder.upsample.1.out_layers.3",
                 "decoder.upsample.0.skip_connection"):
        layer = model.get_submodule(name)
        weight, bias = file_state[f"{name}.conv.weight"], file_state[f"{name}.conv.bias"]
        x = SparseTensor(coords, torch.randn(len(coords), weight.shape[-1], generator=gen))
        dense = torch.zeros(1, weight.shape[-1], res, res, res)
        dense[0, :, coords[:, 1], coords[:, 2], coords[:, 3]] = x.feats.t()
        k = weight.shape[1]
        ref = F.conv3d(dense, weight.permute(0, 4, 1, 2, 3), bias, padding=k // 2)
        with torch.no_grad():
            got = layer(x).feats
        assert torch.allclose(got, ref[0, :, coords[:, 1], coords[:, 2], coords[:, 3]].t(), atol=1e-5)


@pytest.mark.slow
def test_full_size_release_file_loads(tmp_path):
    """A file with the published keys and shapes (random values, ~715 MB float32) through from_triposf."""
    shapes = published_shapes()
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.01 for k, s in shapes.items()}
    path = tmp_path / "pretrained_TripoSFVAE_256i1024o.safetensors"
    save_file(state, str(path))
    del state
    model = SparseFlexVAE.from_triposf(path)
    probe = load_file(str(path))
    assert sum(p.numel() for p in model.parameters()) == 178_833_479
    assert all(torch.equal(v, probe[k]) for k, v in model.state_dict().items())
    del probe
    # and it runs on the CPU: a small patch of oriented points at the release's 256^3 latent resolution
    gen = torch.Generator().manual_seed(1)
    points = (torch.rand(200, 3, generator=gen) - 0.5) * 0.01
    normals = torch.nn.functional.normalize(torch.randn(200, 3, generator=gen), dim=1)
    inp = point_inputs(points, normals, 256)
    with torch.no_grad():
        dec, mean, logvar = model(inp.points, inp.normals, inp.point_batch, inp.coords, sample_posterior=False)
    assert dec.resolution == 1024 and dec.head.shape[1] == 53 and mean.feats.shape == (len(inp.coords), 8)
    assert torch.isfinite(dec.head).all() and torch.isfinite(logvar.feats).all()

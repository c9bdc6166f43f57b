"""`sparseflex reconstruct | encode | decode` with a tiny checkpoint written by the test; latent files; bad input."""

import json

import pytest
import torch
import trimesh
from safetensors.torch import save_file

from sparseflex.cli import main
from sparseflex.data.mesh import Mesh, load_mesh, save_mesh
from sparseflex.models import SparseFlexVAE, save_weights
from sparseflex.pipelines import decode_latent, encode_mesh, load_latent, reconstruct, save_latent

OFFSET = torch.tensor([10.0, 0.0, -4.0])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _commands_registered(monkeypatch):
    """The sub-commands reachable through the real entry point (until ``reconstruct`` is listed in COMMANDS)."""
    from sparseflex import cli
    if "reconstruct" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "reconstruct"])


def random_tiny(seed=0):
    """A tiny VAE with random weights: its SDF changes sign, so it decodes to a non-empty mesh (pruning heads set to
    keep every child, so the surface is not cut to pieces)."""
    model = SparseFlexVAE("tiny")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for up in model.decoder.upsample:
            up.pruning_head.mlp[2].weight.zero_()
            up.pruning_head.mlp[2].bias.fill_(1.0)
    return model.eval()


@pytest.fixture
def files(tmp_path):
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(2, radius=3.0))
    mesh.vertices = mesh.vertices + OFFSET
    mesh_path = save_mesh(tmp_path / "sphere.obj", mesh)
    model = random_tiny()
    ckpt = tmp_path / "train.pt"
    torch.save({"format": "sparseflex-train-1", "model_config": model.config.to_dict(), "model": model.state_dict(),
                "ema": model.state_dict(), "step": 1}, ckpt)
    return mesh_path, ckpt, model


def test_reconstruct_writes_a_ply_in_the_input_frame(files, tmp_path, capsys):
    mesh_path, ckpt, _ = files
    out = tmp_path / "rec.ply"
    argv = ["reconstruct", str(mesh_path), "-o", str(out), "--checkpoint", str(ckpt), "--resolution", "32",
            "--points", "3000", "--metrics-points", "3000", "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["resolution"] == 32 and report["faces"] > 0
    assert set(report["metrics"]) >= {"chamfer", "fscore@0.01", "normal_consistency", "ceiling"}
    rec = load_mesh(out)
    assert len(rec.faces) == report["faces"]
    # decoded in the normalised cube and mapped back: inside the input's box grown by the output voxels' reach
    lo, hi = OFFSET - 3.0, OFFSET + 3.0
    margin = 6.0 * 2 / 32
    assert bool((rec.vertices >= lo - margin).all() and (rec.vertices <= hi + margin).all())
    # never overwritten silently
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_encode_then_decode_equals_reconstruct(files, tmp_path, capsys):
    mesh_path, ckpt, model = files
    weights = save_weights(model, tmp_path / "tiny.safetensors")  # our safetensors: the config travels with it
    latent_path, out = tmp_path / "shape.safetensors", tmp_path / "dec.ply"
    assert main(["encode", str(mesh_path), "-o", str(latent_path), "--checkpoint", str(weights), "--resolution", "32",
                 "--points", "3000", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["latent_resolution"] == 8
    assert main(["decode", str(latent_path), "-o", str(out), "--checkpoint", str(weights), "--chunk-size", "3",
                 "--device", "cpu"]) == 0
    decoded = load_mesh(out)
    direct = reconstruct(model, load_mesh(mesh_path), num_points=3000, resolution=8, metrics=False)
    assert len(decoded.faces) == len(direct.mesh.faces) > 0
    assert torch.allclose(decoded.vertices.mean(0), direct.mesh.vertices.mean(0), atol=1e-3)


def test_latent_file_round_trip(files, tmp_path):
    mesh_path, _, model = files
    latent = encode_mesh(model, load_mesh(mesh_path), num_points=2000, resolution=8)
    path = save_latent(tmp_path / "z.safetensors", latent)
    back = load_latent(path)
    assert torch.equal(back.coords, latent.coords) and torch.equal(back.feats, latent.feats)
    assert back.resolution == 8 and back.transform.scale == pytest.approx(latent.transform.scale)
    a, b = decode_latent(model, latent), decode_latent(model, back)
    assert torch.allclose(a.mesh.vertices, b.mesh.vertices, atol=1e-5)


@pytest.mark.parametrize("case", ["bad_checkpoint", "missing_checkpoint", "resolution", "latent", "not_safetensors",
                                  "suffix"])
def test_bad_input_gives_one_line_error(files, tmp_path, capsys, case):
    mesh_path, ckpt, _ = files
    out = tmp_path / "o.ply"
    argv = ["reconstruct", str(mesh_path), "-o", str(out), "--checkpoint", str(ckpt), "--resolution", "32",
            "--points", "2000", "--no-metrics", "--device", "cpu"]
    expected = {"bad_checkpoint": "truncated or corrupt", "missing_checkpoint": "no such checkpoint",
                "resolution": "multiple of the model's upsampling factor 4", "latent": "not a SparseFlex latent",
                "not_safetensors": "not a readable latent file",
                "suffix": "use .ply or .obj or .glb"}[case]
    if case == "bad_checkpoint":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        argv[argv.index("--checkpoint") + 1] = str(bad)
    elif case == "missing_checkpoint":
        argv[argv.index("--checkpoint") + 1] = str(tmp_path / "nope.safetensors")
    elif case == "resolution":
        argv[argv.index("--resolution") + 1] = "30"
    elif case == "latent":  # a safetensors file that is not a latent
        other = tmp_path / "other.safetensors"
        save_file({"feats": torch.zeros(2, 8)}, str(other))
        argv = ["decode", str(other), "-o", str(out), "--checkpoint", str(ckpt), "--device", "cpu"]
    elif case == "not_safetensors":
        argv = ["decode", str(ckpt), "-o", str(out), "--checkpoint", str(ckpt), "--device", "cpu"]
    elif case == "suffix":
        argv[argv.index("-o") + 1] = str(tmp_path / "o.stl")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err
    assert not out.exists()


def test_all_three_commands_are_registered(capsys):
    from sparseflex.cli import build_parser
    parser = build_parser()
    for name in ("reconstruct", "encode", "decode"):
        with pytest.raises(SystemExit) as exit_code:
            parser.parse_args([name, "--help"])
        assert exit_code.value.code == 0
        assert "--checkpoint" in capsys.readouterr().out

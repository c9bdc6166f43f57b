"""TripoSF release parity: ``SparseFlexVAE`` computes what the release's VAE code computes.

The oracle is ``../shared/data/triposf_parity/`` (reference outputs of the release's own code for a small random-weight
configuration; its README lists every array). The release behaviours it encodes: pruning off at inference, the
pruning head's tanh GELU, posterior sampling, the 1/(4R - 1) point dilation, per-chunk decoding with repeated seam
voxels, and the FlexiCubes quad split on gamma ties.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sparseflex.cli import main
from sparseflex.data.mesh import load_mesh
from sparseflex.data.voxelize import jittered_voxels
from sparseflex.errors import OptionError
from sparseflex.flexicubes import SparseFlex
from sparseflex.models import SparseFlexVAE, VAEConfig, get_config, load_weights, read_checkpoint, release_chunks
from sparseflex.nn import SparseTensor
from sparseflex.pipelines import reconstruct
from sparseflex.sparse import coords_to_keys

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "triposf_parity"
SHARED_MESHES = FIXTURE.parent / "meshes"
R = 16  # the fixture's latent resolution

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture():
    if not (FIXTURE / "reference.npz").is_file():
        pytest.skip(f"TripoSF parity fixture not found at {FIXTURE}")
    ref = {k: torch.from_numpy(v) for k, v in np.load(FIXTURE / "reference.npz").items()}
    config = VAEConfig.from_dict(json.loads((FIXTURE / "config.json").read_text()))
    model = SparseFlexVAE(config)
    load_weights(model, read_checkpoint(FIXTURE / "weights.safetensors").state, "fixture")  # strict: keys and shapes
    return model.eval(), ref


@pytest.fixture(scope="module")
def latent_mean(fixture):
    _, ref = fixture
    return SparseTensor(ref["latent_coords"].long(), ref["mean"], 1)


def assert_same_rows(coords, head, ref_coords, ref_head, tol=1e-5):
    """The rows ``(coords, head)`` equal the reference rows as a multiset (repeated voxels included)."""
    assert len(coords) == len(ref_coords)
    proj = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def canonical(c, h):  # by voxel, then copies of a voxel by a random projection of their features
        order = np.lexsort(((h.double() @ proj).numpy(), coords_to_keys(c.long()).numpy()))
        return coords_to_keys(c.long())[order], h[order]

    k, h = canonical(coords, head)
    rk, rh = canonical(ref_coords, ref_head)
    assert torch.equal(k, rk)
    assert (h - rh).abs().max().item() < tol


# -- encoder ----------------------------------------------------------------------------------------------------------

def test_encoder_equals_release(fixture):
    model, ref = fixture
    points, normals, coords = ref["points"], ref["normals"], ref["latent_coords"].long()
    batch = torch.zeros(len(points), dtype=torch.long)
    with torch.no_grad():
        feats = model.point_features(points, normals, batch, coords, R)
        mean, logvar = model.encode(points, normals, batch, coords, R)
    assert torch.equal(feats.coords, coords)
    assert (feats.feats - ref["pointnet_feats"]).abs().max() < 1e-5
    assert (mean.feats - ref["mean"]).abs().max() < 1e-5
    assert (logvar.feats - ref["logvar"]).abs().max() < 1e-5


def test_encoder_under_fp16_autocast_keeps_the_pointnet_in_float32(fixture):
    """The release runs under fp16 autocast with its PointNet in float32 (checked here with the CPU's autocast; the
    command line offers fp16 on CUDA only)."""
    model, ref = fixture
    points, normals, coords = ref["points"], ref["normals"], ref["latent_coords"].long()
    batch = torch.zeros(len(points), dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        feats = model.point_features(points, normals, batch, coords, R)
        mean, _ = model.encode(points, normals, batch, coords, R)
    assert feats.feats.dtype == torch.float32
    assert (feats.feats - ref["pointnet_feats"]).abs().max() < 1e-5
    rel = (mean.feats.float() - ref["mean"]).abs().max() / ref["mean"].abs().max()
    assert 0 < rel < 1e-2  # half precision in the transformer: about 1e-3, as the release


# -- decoder ----------------------------------------------------------------------------------------------------------

def test_decoder_without_pruning_keeps_every_child_and_equals_release(fixture, latent_mean):
    model, ref = fixture
    with torch.no_grad():
        dec = model.decode(latent_mean, resolution=R, prune=False)
    assert len(dec.coords) == 64 * len(latent_mean.coords)
    assert_same_rows(dec.coords, dec.head, ref["whole_coords"], ref["whole_head"])
    # our memory-bounded chunking keeps whole-sample statistics: the same rows
    with torch.no_grad():
        chunked = model.decode(latent_mean, resolution=R, prune=False, chunk_size=4)
    assert_same_rows(chunked.coords, chunked.head, ref["whole_coords"], ref["whole_head"])


def test_decoder_with_pruning_equals_release(fixture, latent_mean):
    model, ref = fixture
    with torch.no_grad():
        dec = model.decode(latent_mean, resolution=R, prune=True)
    assert_same_rows(dec.coords, dec.head, ref["pruned_coords"], ref["pruned_head"])


def test_pruning_head_uses_tanh_gelu(fixture):
    model, _ = fixture
    act = model.decoder.upsample[0].pruning_head.mlp[1]
    x = torch.linspace(-4, 4, 101)
    expected = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert (act(x) - expected).abs().max() < 1e-6
    assert (act(x) - torch.nn.functional.gelu(x)).abs().max() > 1e-4  # not the exact erf GELU


def test_release_chunking_equals_release_rows_with_repeated_seam_voxels(fixture, latent_mean):
    model, ref = fixture
    with torch.no_grad():
        dec = model.decode(latent_mean, resolution=R, prune=False, chunking="release")
    assert dec.repeated_voxels
    assert_same_rows(dec.coords, dec.head, ref["chunked_coords"], ref["chunked_head"])
    keys = coords_to_keys(dec.coords)
    assert len(torch.unique(keys)) < len(keys)  # seam voxels come twice


def test_sparseflex_from_release_chunks_averages_every_copy(fixture, latent_mean):
    model, _ = fixture
    with torch.no_grad():
        dec = model.decode(latent_mean, resolution=R, prune=False, chunking="release")
    sf = dec.sparseflex(0)
    out_r = dec.resolution
    keys = coords_to_keys(dec.coords).tolist()
    # independent reference: per corner, the mean of every row's own activated SDF for it; per voxel, its last row
    sums, last = {}, {}
    offsets = [(i & 1, (i >> 1) & 1, (i >> 2) & 1) for i in range(8)]
    for row, (c, h) in enumerate(zip(dec.coords[:, 1:].tolist(), dec.head.double())):
        last[keys[row]] = row
        for i, o in enumerate(offsets):
            corner = (c[0] + o[0], c[1] + o[1], c[2] + o[2])
            s, n = sums.get(corner, (0.0, 0))
            sums[corner] = (s + float(h[i]) * 4 / out_r - 1 / out_r, n + 1)
    assert sf.num_voxels == len(last)  # every voxel once
    corner_sdf = {tuple(c): float(v) for c, v in zip(sf.corners[:, 1:].tolist(), sf.sdf)}
    assert corner_sdf.keys() == sums.keys()
    assert max(abs(corner_sdf[c] - s / n) for c, (s, n) in sums.items()) < 1e-6
    rows = torch.tensor([last[k] for k in coords_to_keys(sf.coords).tolist()])
    assert torch.equal(sf.gamma_raw, dec.head[rows, 52])
    assert torch.equal(sf.beta_raw, dec.head[rows, 32:44])


def test_release_chunks_cover_and_pad():
    coords = torch.cartesian_prod(*[torch.arange(32)] * 3)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1)
    pieces = release_chunks(coords, 32)
    assert len(pieces) == 64  # 4 x 4 x 4 under 150,000 voxels
    rows, start, end = pieces[0]
    assert start.tolist() == [0, 0, 0] and end.tolist() == [8, 8, 8]
    assert len(rows) == 12 ** 3  # [0, 8 + 4) per axis: padding clipped at the grid's border
    rows, start, end = pieces[21]  # chunk (1, 1, 1): padded on both sides
    assert start.tolist() == [8, 8, 8] and len(rows) == 16 ** 3
    with pytest.raises(OptionError, match="divisible by 16"):
        release_chunks(coords, 24)


# -- posterior sampling -----------------------------------------------------------------------------------------------

def test_posterior_sample_has_unit_deviation_with_zero_logvar():
    coords = torch.zeros(12_500, 4, dtype=torch.long)
    mean = SparseTensor(coords, torch.randn(12_500, 8) * 3)
    z = SparseFlexVAE.sample(mean, mean.replace(torch.zeros(12_500, 8)), torch.Generator().manual_seed(1))
    dev = z.feats - mean.feats  # 100,000 values
    assert abs(dev.std().item() - 1) < 0.05 and abs(dev.mean().item()) < 0.05
    z4 = SparseFlexVAE.sample(mean, mean.replace(torch.full((12_500, 8), math.log(4.0))),
                              torch.Generator().manual_seed(1))
    assert torch.allclose(z4.feats - mean.feats, 2 * dev, atol=1e-5)  # std exp(logvar / 2) = 2


def test_sampled_reconstruction_is_reproducible(fixture, shared_meshes):
    model, _ = fixture
    mesh = load_mesh(shared_meshes / "open" / "gc_moebius.obj")
    run = lambda seed: reconstruct(model, mesh, num_points=20_000, seed=seed, sample=True, metrics=False)  # noqa: E731
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.latent.feats, b.latent.feats) and torch.equal(a.mesh.vertices, b.mesh.vertices)
    assert torch.equal(a.mesh.faces, b.mesh.faces)
    assert not torch.equal(a.latent.feats, c.latent.feats)
    mean = reconstruct(model, mesh, num_points=20_000, seed=3, metrics=False)
    assert torch.equal(mean.latent.coords, a.latent.coords) and not torch.equal(mean.latent.feats, a.latent.feats)


# -- input voxels -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frac, below", [(0.2502, True), (0.2503, False)])
def test_release_dilation_reaches_256_over_1023_of_a_voxel(frac, below):
    r = 256
    u = torch.tensor([[100 + frac, 100.5, 100.5]], dtype=torch.float64)
    points = (u / r - 0.5).float()
    assert float((points.double()[0, 0] + 0.5) * r) == pytest.approx(100 + frac, abs=2e-5)  # float32 keeps it
    jitter = get_config("triposf").input_jitter(r)
    assert jitter == pytest.approx(256 / 1023)
    xs = set(jittered_voxels(points, r, jitter)[:, 0].tolist())
    assert xs == ({99, 100} if below else {100})
    # our own configurations grow by exactly one output voxel (a quarter of a latent voxel)
    assert set(jittered_voxels(points, r, get_config("small").input_jitter(r))[:, 0].tolist()) == {100}


def test_triposf_defaults_are_the_release_inference():
    t, s = get_config("triposf"), get_config("small")
    assert (t.prune, t.voxel_dilation) == (False, "release")
    assert (s.prune, s.voxel_dilation) == (True, "fine")
    assert VAEConfig.from_dict({**s.to_dict(), "prune": False}).prune is False  # stored with a checkpoint
    with pytest.raises(OptionError):
        VAEConfig.from_dict({**s.to_dict(), "voxel_dilation": "half"})


# -- quad split on gamma ties -----------------------------------------------------------------------------------------

def _release_diagonal(voxels, first_corner_sdf, gamma):
    """The release's rule, restated: the four voxels around an edge in (x, y, z) order c0..c3 form the quad; the
    diagonal c0-c3 is taken when g0 g3 > g1 g2, or on a tie when the SDF at the edge's first corner is <= 0."""
    c = sorted(voxels)
    g03, g12 = gamma[c[0]] * gamma[c[3]], gamma[c[1]] * gamma[c[2]]
    if g03 > g12 or (g03 == g12 and first_corner_sdf <= 0):
        return {c[0], c[3]}
    return {c[1], c[2]}


@pytest.mark.parametrize("centre_sign", [-1.0, 1.0])
@pytest.mark.parametrize("gamma_kind", ["tie", "saturated", "unequal"])
def test_quad_split_follows_the_release_rule(centre_sign, gamma_kind):
    # 2 x 2 x 2 voxels around the grid corner P = (2, 2, 2); only P has its own sign, so the 6 edges at P cross,
    # each shared by 4 voxels: 6 quads, with the first corner of x/z edges at the low end and of y edges at the high
    # end (SPEC edge order), so both signs of the first corner occur on every axis.
    r = 4
    coords = torch.cartesian_prod(*[torch.tensor([1, 2])] * 3)
    p = torch.tensor([2, 2, 2])
    sf = SparseFlex.from_sdf(coords, r, lambda pos: torch.where(
        ((pos + 0.5) * r - p).abs().sum(1) < 1e-6, centre_sign * -0.1, centre_sign * 0.1).double())
    voxels = [tuple(c) for c in sf.coords[:, 1:].tolist()]
    if gamma_kind == "saturated":  # sigmoid(30) == 1 in float: every product equal
        sf.gamma_raw = torch.full((8,), 30.0, dtype=sf.sdf.dtype)
    elif gamma_kind == "unequal":
        sf.gamma_raw = torch.linspace(-2, 2, 8, dtype=sf.sdf.dtype)[torch.randperm(8)]
    gamma = dict(zip(voxels, sf.weights()[2].tolist()))
    ex = sf.extract()
    assert len(ex.faces) == 12
    vox_of = [tuple(v) for v in ((ex.vertices + 0.5) * r).floor().long().tolist()]  # dual vertices lie inside
    tri_voxels = [{vox_of[i] for i in f} for f in ex.faces.tolist()]
    corner_sdf = {tuple(c): float(s) for c, s in zip(sf.corners[:, 1:].tolist(), sf.sdf)}
    checked = 0
    for axis in range(3):
        for step in (-1, 1):
            q = p.clone()
            q[axis] += step
            lo, hi = (q, p) if step < 0 else (p, q)
            first = hi if axis == 1 else lo  # y edges run from high y to low y
            around = {v for v in voxels if all(v[a] in (int(lo[a]) - 1, int(lo[a])) for a in range(3) if a != axis)
                      and v[axis] == int(lo[axis])}
            assert len(around) == 4
            tris = [t for t in tri_voxels if t <= around]
            assert len(tris) == 2
            expected = _release_diagonal(around, corner_sdf[tuple(first.tolist())], gamma)
            assert tris[0] & tris[1] == expected
            checked += 1
    assert checked == 6


# -- command line -----------------------------------------------------------------------------------------------------

@pytest.fixture
def release_file(fixture, tmp_path):
    """The fixture's weights as a release-layout file (no metadata) and its config as JSON."""
    weights = tmp_path / "release.safetensors"
    save_file(load_file(str(FIXTURE / "weights.safetensors")), str(weights))
    config = tmp_path / "config.json"
    config.write_text((FIXTURE / "config.json").read_text())
    return weights, config


@pytest.mark.parametrize("switches", [[], ["--no-prune"], ["--prune", "--sample"], ["--no-prune", "--chunking", "release"],
                                      ["--no-prune", "--chunking", "release", "--sample", "--seed", "2"],
                                      ["--prune", "--chunking", "release"]])
def test_reconstruct_cli_runs_each_switch_combination(release_file, shared_meshes, tmp_path, capsys, switches):
    weights, config = release_file
    out = tmp_path / "out.ply"
    argv = ["reconstruct", str(shared_meshes / "open" / "gc_moebius.obj"), "-o", str(out), "--checkpoint",
            str(weights), "--config", str(config), "--points", "20000", "--metrics-points", "2000", "--device", "cpu",
            *switches]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["resolution"] == 64 and out.is_file()
    if "--no-prune" in switches or "--prune" not in switches:  # the fixture config prunes unless told not to
        assert report["voxels"] >= (60 * 64 if "--no-prune" in switches else 1)


@pytest.mark.parametrize("switches, message", [
    (["--chunking", "bogus"], "invalid choice"),
    (["--precision", "fp16"], "fp16 inference needs a CUDA device"),
    (["--precision", "bf16"], "invalid choice"),
    (["--chunking", "release", "--resolution", "96"], "divisible by 16"),
])
def test_reconstruct_cli_bad_switches_give_one_line(release_file, shared_meshes, tmp_path, capsys, switches, message):
    weights, config = release_file
    out = tmp_path / "out.ply"
    argv = ["reconstruct", str(shared_meshes / "open" / "gc_moebius.obj"), "-o", str(out), "--checkpoint",
            str(weights), "--config", str(config), "--points", "20000", "--no-metrics", "--device", "cpu", *switches]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects unknown choices itself
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()

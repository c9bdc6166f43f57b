"""SparseFlex VAE: release sizes against the published key list, shapes, zero-initialised branches, teacher forcing,
batching, activation checkpointing, chunked decoding and the encoder inputs."""

from pathlib import Path

import pytest
import torch
import trimesh

from sparseflex.data.mesh import Mesh
from sparseflex.data.voxelize import voxelize
from sparseflex.errors import OptionError
from sparseflex.models import (SparseFlexVAE, VAEConfig, chunk_rows, get_config, jittered_voxels, kl_divergence,
                               mesh_inputs, pruning_bce)
from sparseflex.sparse import VoxelHash, coords_to_keys, dense_grid, subdivide

KEYS_TSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "triposf_vae_keys.tsv"
R = 8  # latent resolution of the tests (tiny config: output 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def published_keys():
    if not KEYS_TSV.is_file():
        pytest.skip(f"{KEYS_TSV} not found")
    rows = [line.split("\t") for line in KEYS_TSV.read_text().strip().splitlines()]
    return {k: [int(s) for s in shape.strip("[]").split(",")] for k, shape in rows}


def sphere_inputs(radius=0.4, centre=(0.0, 0.0, 0.0), points=1500, seed=0):
    tm = trimesh.creation.icosphere(2, radius=radius)
    mesh = Mesh(torch.tensor(tm.vertices, dtype=torch.float32) + torch.tensor(centre), torch.tensor(tm.faces))
    return mesh_inputs(mesh, R, points, seed=seed)


def randomise(model, std=0.2, seed=0):
    """Random values in every parameter, zero-initialised ones included (so every branch is live)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def keys_of(coords):
    return set(coords_to_keys(coords).tolist())


# -- release sizes ----------------------------------------------------------------------------------------------------

def test_triposf_keys_and_shapes_equal_published_list():
    expected = published_keys()
    with torch.device("meta"):
        model = SparseFlexVAE("triposf")
    state = model.state_dict()
    assert list(state) == list(expected)  # same names, same order
    assert {k: list(v.shape) for k, v in state.items()} == expected
    assert len(state) == 257
    assert sum(v.numel() for v in state.values()) == 178_833_479
    assert sum(p.numel() for p in model.parameters()) == 178_833_479
    c = model.config
    assert (c.latent_resolution, c.output_resolution) == (256, 1024)


def test_config_round_trip_and_errors():
    c = get_config("small", use_checkpoint=True)
    assert VAEConfig.from_dict(c.to_dict()) == c and c.use_checkpoint
    with pytest.raises(OptionError, match="unknown VAE config"):
        get_config("huge")
    with pytest.raises(OptionError, match="unknown VAE config fields"):
        VAEConfig.from_dict({"width": 3})
    with pytest.raises(OptionError, match="divisible"):
        VAEConfig(model_channels=100, num_heads=12)


# -- forward ----------------------------------------------------------------------------------------------------------

def test_tiny_forward_shapes_and_finiteness():
    inp = sphere_inputs()
    model = SparseFlexVAE("tiny")
    dec, mean, logvar = model(inp.points, inp.normals, inp.point_batch, inp.coords, resolution=R)
    n = len(inp.coords)
    assert mean.feats.shape == logvar.feats.shape == (n, 8)
    assert torch.equal(mean.coords, inp.coords)
    assert dec.resolution == 4 * R and [p.resolution for p in dec.prune] == [2 * R, 4 * R]
    # candidates of each level are the 8 children of the previous level's kept voxels
    assert torch.equal(dec.prune[0].coords, subdivide(inp.coords))
    assert dec.prune[1].logits.shape == (len(dec.prune[1].coords),)
    assert dec.head.shape == (len(dec.coords), 53)
    assert all(torch.isfinite(t).all() for t in (mean.feats, logvar.feats, dec.head, dec.prune[0].logits))
    assert torch.isfinite(kl_divergence(mean, logvar))
    # a fresh model: zero-initialised pruning heads keep every child
    assert len(dec.coords) == 64 * n
    loss = (dec.head * torch.randn_like(dec.head)).mean() + sum(p.logits.mean() for p in dec.prune) + mean.feats.sum()
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # zero-initialised last layers get the gradient first
    assert grads["decoder.out_layer.weight"].abs().sum() > 0
    assert grads["encoder.out_layer.weight"].abs().sum() > 0
    assert grads["decoder.upsample.1.pruning_head.mlp.2.weight"].abs().sum() > 0


def test_zero_initialised_head_gives_neutral_sparseflex():
    inp = sphere_inputs()
    model = SparseFlexVAE("tiny").eval()
    with torch.no_grad():
        mean, logvar = model.encode(inp.points, inp.normals, inp.point_batch, inp.coords, R)
        dec = model.decode(mean, resolution=R)
    assert mean.feats.abs().max() == 0 and logvar.feats.abs().max() == 0  # zero-initialised encoder output layer
    sf = dec.sparseflex(0)
    assert sf.resolution == 4 * R and sf.num_voxels == len(dec.coords)
    for raw in (sf.alpha_raw, sf.beta_raw, sf.gamma_raw, sf.deform):
        assert raw.abs().max() == 0
    assert torch.allclose(sf.sdf, torch.full_like(sf.sdf, -1.0 / (4 * R)))  # raw 0 -> -1/R (release activation)


def test_logvar_is_clamped():
    inp = sphere_inputs()
    model = SparseFlexVAE("tiny")
    with torch.no_grad():
        model.encoder.out_layer.bias[8:12] = 100.0
        model.encoder.out_layer.bias[12:] = -100.0
        _, logvar = model.encode(inp.points, inp.normals, inp.point_batch, inp.coords, R)
    assert torch.all(logvar.feats[:, :4] == 20.0) and torch.all(logvar.feats[:, 4:] == -30.0)


def test_teacher_forcing_keeps_exactly_the_ground_truth_children():
    inp = sphere_inputs()
    model = randomise(SparseFlexVAE("tiny"))
    gen = torch.Generator().manual_seed(1)
    children = subdivide(inp.coords)
    level1 = children[torch.rand(len(children), generator=gen) < 0.4]
    outside = torch.tensor([[0, 2 * R - 1, 2 * R - 1, 2 * R - 1]])  # not a child of any active voxel
    assert VoxelHash(children).lookup(outside)[0] < 0
    grand = subdivide(level1)
    level2 = grand[torch.rand(len(grand), generator=gen) < 0.3]
    with torch.no_grad():
        mean, _ = model.encode(inp.points, inp.normals, inp.point_batch, inp.coords, R)
        dec = model.decode(mean, occupancy=[torch.cat([level1, outside]), level2], resolution=R)
        free = model.decode(mean, resolution=R)
    kept1 = dec.prune[1].coords.clone()
    kept1[:, 1:] //= 2
    assert keys_of(kept1) == keys_of(level1)
    assert keys_of(dec.coords) == keys_of(level2)
    # logits do not depend on the targets; without them the kept children are those with logit >= 0
    assert torch.allclose(dec.prune[0].logits, free.prune[0].logits, atol=1e-5)
    # the pruning loss: BCE of each candidate's logit against membership in the ground truth
    occupancy = [torch.cat([level1, outside]), level2]
    expected = []
    for level, occ in zip(dec.prune, occupancy):
        truth = keys_of(occ)
        target = torch.tensor([float(k in truth) for k in coords_to_keys(level.coords).tolist()])
        x = level.logits.double()
        expected.append(-(target * torch.nn.functional.logsigmoid(x)
                          + (1 - target) * torch.nn.functional.logsigmoid(-x)).mean())
    assert float(pruning_bce(dec.prune, occupancy)) == pytest.approx(float(sum(expected) / 2), rel=1e-4)
    kept_free = free.prune[1].coords.clone()
    kept_free[:, 1:] //= 2
    assert keys_of(kept_free) == keys_of(free.prune[0].coords[free.prune[0].logits >= 0])
    assert 0 < len(kept_free) < len(free.prune[0].coords)


def test_batch_items_are_independent():
    a, b = sphere_inputs(0.3, (0.1, 0.0, 0.0), seed=0), sphere_inputs(0.45, seed=1)
    model = randomise(SparseFlexVAE("tiny")).eval()
    points = torch.cat([a.points, b.points])
    normals = torch.cat([a.normals, b.normals])
    point_batch = torch.cat([a.point_batch, b.point_batch + 1])
    coords = torch.cat([a.coords, b.coords + torch.tensor([1, 0, 0, 0])])
    with torch.no_grad():
        dec, mean, _ = model(points, normals, point_batch, coords, sample_posterior=False, resolution=R)
        for i, inp in enumerate((a, b)):
            single, m1, _ = model(inp.points, inp.normals, inp.point_batch, inp.coords, sample_posterior=False,
                                  resolution=R)
            rows = dec.rows(i)
            assert torch.equal(dec.coords[rows, 1:], single.coords[:, 1:])
            assert torch.allclose(dec.head[rows], single.head, atol=1e-4, rtol=1e-4)
            assert torch.allclose(mean.feats[mean.coords[:, 0] == i], m1.feats, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    inp = sphere_inputs(points=600)
    grads = []
    for use_checkpoint in (False, True):
        model = randomise(SparseFlexVAE(get_config("tiny", use_checkpoint=use_checkpoint)))
        torch.manual_seed(3)
        dec, mean, logvar = model(inp.points, inp.normals, inp.point_batch, inp.coords, resolution=R)
        (dec.head.square().mean() + sum(p.logits.mean() for p in dec.prune) + kl_divergence(mean, logvar)).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# -- chunked decoding -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk, batch", [(2, 1), (3, 2)])
def test_chunked_decoding_equals_unchunked(chunk, batch):
    shapes = [sphere_inputs(), sphere_inputs(0.3, (0.1, 0.0, 0.0), seed=1)][:batch]
    model = randomise(SparseFlexVAE("tiny"), std=0.3).eval()
    points = torch.cat([s.points for s in shapes])
    normals = torch.cat([s.normals for s in shapes])
    point_batch = torch.cat([s.point_batch + i for i, s in enumerate(shapes)])
    coords = torch.cat([s.coords + torch.tensor([i, 0, 0, 0]) for i, s in enumerate(shapes)])
    with torch.no_grad():
        mean, _ = model.encode(points, normals, point_batch, coords, R)
        full = model.decode(mean, resolution=R)
        chunked = model.decode(mean, resolution=R, chunk_size=chunk)
    assert 0 < len(full.coords) < 64 * len(coords)  # the random pruning heads drop children
    order = torch.argsort(coords_to_keys(full.coords))
    assert torch.equal(chunked.coords, full.coords[order])
    scale = full.head.abs().max()
    assert torch.allclose(chunked.head, full.head[order], atol=1e-5 * scale)
    assert chunked.resolution == full.resolution


def test_chunk_rows_owns_each_voxel_once_with_exact_halo():
    gen = torch.Generator().manual_seed(0)
    coords = torch.cat([dense_grid(11), dense_grid(11) + torch.tensor([1, 0, 0, 0])])
    coords = coords[torch.rand(len(coords), generator=gen) < 0.3]
    side, halo = 4, 1
    pieces = chunk_rows(coords, side, halo)
    owned = torch.cat([rows[core] for rows, core in pieces])
    assert torch.equal(torch.sort(owned).values, torch.arange(len(coords)))
    for rows, core in pieces:
        own = coords[rows[core]]
        b, box = own[0, 0], torch.div(own[0, 1:], side, rounding_mode="floor") * side
        inside = ((coords[:, 1:] >= box - halo) & (coords[:, 1:] < box + side + halo)).all(1) & (coords[:, 0] == b)
        assert torch.equal(rows, inside.nonzero().squeeze(1))


# -- inputs -----------------------------------------------------------------------------------------------------------

def test_jittered_voxels_match_sampled_jitter():
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(50, 3, generator=gen) - 0.5
    r, jitter = 8, 0.3
    got = keys_of(jittered_voxels(points, r, jitter))
    # dense sampling of each point's jitter box, corners included
    t = torch.linspace(-jitter, jitter, 7)
    offsets = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3) / r
    moved = ((points[:, None] + offsets[None] + 0.5) * r).floor().long().reshape(-1, 3)
    moved = moved[((moved >= 0) & (moved < r)).all(1)]
    assert got == keys_of(moved)


def test_mesh_inputs_cover_triangles_and_points():
    tm = trimesh.creation.icosphere(2, radius=0.4)
    mesh = Mesh(torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces))
    inp = mesh_inputs(mesh, R, 2000, jitter=0.25)
    active = keys_of(inp.coords)
    assert keys_of(voxelize(mesh, R)) <= active
    assert jittered_voxels(inp.points, R, 0.25).shape[0] <= len(active)
    assert keys_of(jittered_voxels(inp.points, R, 0.25)) <= active
    assert inp.points.shape == inp.normals.shape == (2000, 3)
    assert torch.allclose(inp.normals.norm(dim=1), torch.ones(2000))
    with pytest.raises(OptionError):
        jittered_voxels(inp.points, R, 1.5)


def test_points_outside_active_voxels_are_ignored():
    inp = sphere_inputs()
    model = randomise(SparseFlexVAE("tiny")).eval()
    stray = torch.tensor([[0.49, 0.49, 0.49]])  # a corner voxel the sphere does not reach
    assert VoxelHash(inp.coords).lookup(torch.tensor([[0, R - 1, R - 1, R - 1]]))[0] < 0
    with torch.no_grad():
        m0, _ = model.encode(inp.points, inp.normals, inp.point_batch, inp.coords, R)
        m1, _ = model.encode(torch.cat([inp.points, stray]), torch.cat([inp.normals, stray]),
                             torch.cat([inp.point_batch, torch.zeros(1, dtype=torch.long)]), inp.coords, R)
    assert torch.equal(m0.feats, m1.feats)

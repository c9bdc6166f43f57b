"""The structured-latent (SLat) flow: TRELLIS' sparse U-Net + DiT velocity network on the SparseFlex latent."""

import json

import pytest
import torch
import torch.nn.functional as F

import sparseflex.nn.modulated as modulated
from sparseflex.errors import InputError, OptionError
from sparseflex.models import (SLAT_FLOW_CONFIGS, RectifiedFlow, SLatFlow, SLatFlowConfig, get_slat_flow_config,
                               read_slat_flow_config)
from sparseflex.models.slat_flow import SparseResBlock3d
from sparseflex.nn import SparseTensor
from sparseflex.nn.modulated import chunked_attention


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models: on a shared machine a second thread mostly adds wake-up latency to every op."""


def voxels(n, res, seed, batch=0):
    """``n`` distinct random voxels of a ``res^3`` grid as ``[n, 4]`` rows of item ``batch``, in raster order."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(res ** 3, generator=g)[:n].sort().values
    xyz = torch.stack([keys // res ** 2, keys // res % res, keys % res], 1)
    return torch.cat([torch.full((n, 1), batch), xyz], 1)


def batch_of(items, channels=8, dtype=torch.float32, seed=0):
    """A SparseTensor of the given ``[n, 4]`` voxel sets (item b gets batch index b) with random features."""
    coords = torch.cat([c.clone().index_fill_(1, torch.tensor([0]), b) for b, c in enumerate(items)])
    g = torch.Generator().manual_seed(seed)
    return SparseTensor(coords, torch.randn(len(coords), channels, generator=g, dtype=dtype), len(items))


def perturb(model, std=0.1):
    """Give the zero-initialised layers (adaLN, cross-attention output, residual convs, output head) random weights."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("adaLN_modulation", "cross_attn.to_out", "final_layer.linear", "conv2")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def zero_init_names(model):
    return [n for n, _ in model.named_parameters()
            if any(k in n for k in ("adaLN_modulation", "cross_attn.to_out", "final_layer.linear", "conv2"))]


# ---- behaviour ------------------------------------------------------------------------------------------------


def test_fresh_model_outputs_zeros_and_its_zero_layers_learn():
    model = SLatFlow("tiny")
    x = batch_of([voxels(30, 8, 0), voxels(50, 8, 1)])
    t, cond = torch.tensor([50.0, 800.0]), torch.randn(2, 3, 64)
    out = model(x, t, cond)
    assert out.shape == (80, 8) and torch.equal(out.feats, torch.zeros(80, 8))
    assert out.coords is x.coords
    out.feats.square().sum().backward()  # zero loss: nothing moves
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters() if p.grad is not None)

    target = torch.randn(80, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        (model(x, t, cond).feats - target).square().mean().backward()
        grads = {n: float(p.grad.abs().sum()) for n, p in model.named_parameters()}
        if step == 0:
            # only the output layer sees a gradient through a zero output layer
            assert grads["final_layer.linear.weight"] > 0
            assert all(v == 0 for n, v in grads.items() if not n.startswith("final_layer"))
        else:
            # one step later every zero-initialised layer learns (adaLN-Zero does not deadlock)
            assert all(grads[n] > 0 for n in zero_init_names(model)), [n for n in zero_init_names(model)
                                                                       if grads[n] == 0]
        opt.step()


def test_items_are_independent_and_rows_keep_their_order():
    torch.manual_seed(0)
    model = perturb(SLatFlow("tiny")).eval()
    a, b = voxels(37, 8, 2), voxels(61, 10, 3)
    x = batch_of([a, b])
    t, cond = torch.tensor([120.0, 640.0]), torch.randn(2, 5, 64)
    with torch.no_grad():
        out = model(x, t, cond)
        assert torch.equal(out.coords, x.coords) and out.shape == (98, 8)
        alone_a = model(SparseTensor(a, x.feats[:37], 1), t[:1], cond[:1])
        alone_b = model(SparseTensor(b.index_fill(1, torch.tensor([0]), 0), x.feats[37:], 1), t[1:], cond[1:])
        assert torch.allclose(out.feats[:37], alone_a.feats, atol=1e-5)
        assert torch.allclose(out.feats[37:], alone_b.feats, atol=1e-5)
        assert not torch.allclose(out.feats[:37], torch.zeros(37, 8))  # the perturbed model does something
        # a different item B (more voxels, other features, other time and condition) leaves item A alone
        y = batch_of([a, voxels(90, 12, 4)], seed=5)
        y.feats[:37] = x.feats[:37]
        out2 = model(y, torch.tensor([120.0, 10.0]), torch.cat([cond[:1], torch.randn(1, 5, 64)]))
        assert torch.allclose(out2.feats[:37], alone_a.feats, atol=1e-5)
        # an empty item between two others is allowed and changes nothing
        z = batch_of([a, a[:0], b])
        z.feats.copy_(torch.cat([x.feats[:37], x.feats[37:]]))
        out3 = model(z, torch.tensor([120.0, 300.0, 640.0]), torch.cat([cond[:1], cond]))
        assert torch.isfinite(out3.feats).all()
        assert torch.allclose(out3.feats, out.feats, atol=1e-5)


def test_permuting_rows_within_items_permutes_the_output():
    # the model reads coordinates, never row order: shuffle each item's rows, get the same rows back shuffled
    torch.manual_seed(0)
    model = perturb(SLatFlow("tiny")).double()
    x = batch_of([voxels(45, 8, 6), voxels(33, 8, 7)], dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    perm = torch.cat([torch.randperm(45, generator=g), 45 + torch.randperm(33, generator=g)])
    y = SparseTensor(x.coords[perm], x.feats[perm], 2)
    t, cond = torch.tensor([400.0, 900.0], dtype=torch.float64), torch.randn(2, 4, 64, dtype=torch.float64)
    with torch.no_grad():
        out, out_perm = model(x, t, cond), model(y, t, cond)
    assert torch.allclose(out_perm.feats, out.feats[perm], atol=1e-10)
    # ...while moving the structure does change it (absolute token positions)
    moved = SparseTensor(x.coords + torch.tensor([0, 2, 0, 0]), x.feats, 2)
    with torch.no_grad():
        assert not torch.allclose(model(moved, t, cond).feats, out.feats, atol=1e-6)


def test_residual_block_matches_a_dense_computation():
    # on a full grid the sparse block is dense torch: LayerNorms, conv3d with zero padding, 2x2x2 average pooling
    torch.manual_seed(0)
    block = perturb(SparseResBlock3d(6, 10, 12, resample="down")).double()
    with torch.no_grad():
        block.norm1.weight.uniform_(0.5, 1.5)
        block.norm1.bias.uniform_(-0.5, 0.5)
    r = torch.arange(4)
    xyz = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    x = SparseTensor(torch.cat([torch.zeros(64, 1, dtype=torch.long), xyz], 1), torch.randn(64, 6, dtype=torch.float64))
    emb = torch.randn(1, 10, dtype=torch.float64)
    out = block(x, emb)

    def conv(h, layer):  # [1, C, D, H, W] with the sparse kernel layout [out, kx, ky, kz, in]
        return F.conv3d(h, layer.weight.permute(0, 4, 1, 2, 3), layer.bias, padding=1)

    def ln(h, norm):  # over channels of a [1, C, D, H, W] grid
        return F.layer_norm(h.movedim(1, -1), h.shape[1:2], norm.weight, norm.bias, 1e-6).movedim(-1, 1)

    grid = x.feats.t().reshape(1, 6, 4, 4, 4)
    grid = F.avg_pool3d(grid, 2)
    scale, shift = block.emb_layers(emb).chunk(2, dim=1)
    h = conv(F.silu(ln(grid, block.norm1)), block.conv1)
    h = ln(h, block.norm2) * (1 + scale[..., None, None, None]) + shift[..., None, None, None]
    h = conv(F.silu(h), block.conv2)
    h = h + F.conv3d(grid, block.skip_connection.weight[..., None, None, None], block.skip_connection.bias)
    assert torch.equal(out.coords[:, 1:], xyz.reshape(4, 4, 4, 3)[::2, ::2, ::2].reshape(-1, 3) // 2)
    assert torch.allclose(out.feats, h.reshape(12, 8).t(), atol=1e-10)


# ---- attention memory ---------------------------------------------------------------------------------------------


def test_chunked_attention_equals_one_call(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 37, 4), torch.randn(2, 3, 23, 4), torch.randn(2, 3, 23, 4)
    key_mask = torch.rand(2, 1, 1, 23) > 0.3
    full_mask = torch.rand(2, 1, 37, 23) > 0.3
    full_mask[..., 0] = True
    expected = [F.scaled_dot_product_attention(q, k, v, attn_mask=m) for m in (None, key_mask, full_mask)]
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        calls.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return sdpa(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(modulated, "CPU_ATTENTION_ELEMENTS", 6 * 23 * 5)  # 5 queries per call
    for m, e in zip((None, key_mask, full_mask), expected):
        calls.clear()
        assert torch.allclose(chunked_attention(q, k, v, m), e, atol=1e-6)
        assert len(calls) == 8 and max(calls) <= 6 * 23 * 5


def test_many_tokens_chunked_equal_unchunked(monkeypatch):
    torch.manual_seed(0)
    model = perturb(SLatFlow(get_slat_flow_config("tiny", resolution=32))).eval()
    x = batch_of([voxels(300, 32, 8)])
    t, cond = torch.tensor([500.0]), torch.randn(1, 6, 64)
    with torch.no_grad():
        whole = model(x, t, cond)
        tokens = len(torch.unique(x.coords[:, 1:] // 2, dim=0))
        assert tokens > 250
        calls = []
        sdpa = F.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None):
            calls.append((q.shape[2], q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]))
            return sdpa(q, k, v, attn_mask=attn_mask)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        limit = 2 * tokens * 16  # 16 queries per self-attention call (2 heads); cross-attention to 6 tokens fits whole
        monkeypatch.setattr(modulated, "CPU_ATTENTION_ELEMENTS", limit)
        chunked = model(x, t, cond)
    assert max(scores for _, scores in calls) <= limit
    assert sum(queries == 16 for queries, _ in calls) >= 2 * (tokens // 16)  # both blocks' self-attention chunked
    assert torch.allclose(chunked.feats, whole.feats, atol=1e-5)


# ---- presets, config, training ----------------------------------------------------------------------------------


def trellis_slat_flow_params(c=1024, cc=1024, io=128, mlp=4, blocks=24, emb=1024):
    """TRELLIS' SLatFlowModel(io_block_channels=[128], num_io_res_blocks=2, patch 2, qk RMS norm), counted from its
    layer list (spconv SubMConv3d: 27 in out weights + out biases)."""
    def res_block(cin, cout):  # norm1 (affine), conv1, conv2, emb_layers, skip linear when the width changes
        return 2 * cin + (27 * cin * cout + cout) + (27 * cout * cout + cout) + (emb * 2 * cout + 2 * cout) + (
            cin * cout + cout if cin != cout else 0)

    self_attn = 3 * c * c + 3 * c + c * c + c + 2 * c  # to_qkv, to_out, q/k RMS gammas [16, 64]
    cross = c * c + c + 2 * c * cc + 2 * c + c * c + c  # to_q, to_kv, to_out
    block = self_attn + 2 * c + cross + (2 * mlp * c * c + mlp * c + c) + 6 * c * c + 6 * c  # + norm2, mlp, adaLN
    t_embedder = 256 * c + c + c * c + c
    return (t_embedder + (8 * io + io) + res_block(io, io) + res_block(io, c) + blocks * block
            + res_block(2 * c, io) + res_block(2 * io, io) + (io * 8 + 8))


def test_trellis_preset_on_the_meta_device():
    cfg = SLAT_FLOW_CONFIGS["trellis"]
    assert (cfg.resolution, cfg.in_channels, cfg.out_channels, cfg.model_channels, cfg.cond_channels, cfg.num_blocks,
            cfg.num_heads, cfg.mlp_ratio, cfg.patch_size, cfg.io_block_channels, cfg.num_io_res_blocks,
            cfg.qk_rms_norm, cfg.qk_rms_norm_cross) == (64, 8, 8, 1024, 1024, 24, 16, 4.0, 2, [128], 2, True, False)
    with torch.device("meta"):
        model = SLatFlow("trellis")
    count = sum(p.numel() for p in model.parameters())
    print(f"\nSLat flow 'trellis': {count:,} parameters")
    assert count == trellis_slat_flow_params() == 600_432_520
    for name in ("small", "tiny"):
        print(f"SLat flow {name!r}: {sum(p.numel() for p in SLatFlow(name).parameters()):,} parameters")


def test_config_round_trip_and_validation(tmp_path):
    for name, cfg in SLAT_FLOW_CONFIGS.items():
        d = json.loads(json.dumps(cfg.to_dict()))
        assert SLatFlowConfig.from_dict(d) == cfg
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
        assert read_slat_flow_config(str(tmp_path / f"{name}.json")) == read_slat_flow_config(name) == cfg
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(OptionError):
        read_slat_flow_config(str(tmp_path / "bad.json"))
    assert get_slat_flow_config("small", num_blocks=3).num_blocks == 3
    assert get_slat_flow_config("tiny", io_block_channels=[], patch_size=1).patch_size == 1
    assert get_slat_flow_config("tiny", io_block_channels=(16, 32), patch_size=4).io_block_channels == [16, 32]
    for bad in ({"patch_size": 4}, {"io_block_channels": [0]}, {"num_heads": 3}, {"num_io_res_blocks": 0},
                {"resolution": 15}, {"mlp_ratio": 0}, {"io_block_channels": 32}):
        with pytest.raises(OptionError):
            get_slat_flow_config("tiny", **bad)
    with pytest.raises(OptionError):
        SLatFlowConfig.from_dict({"bogus": 1})
    with pytest.raises(OptionError):
        get_slat_flow_config("huge")
    model = SLatFlow("tiny")
    x = batch_of([voxels(10, 8, 0)])
    with pytest.raises(InputError):  # condition width
        model(x, torch.zeros(1), torch.zeros(1, 2, 32))
    with pytest.raises(InputError):  # one time per item
        model(x, torch.zeros(2), torch.zeros(1, 2, 64))
    with pytest.raises(InputError):  # latent channels
        model(batch_of([voxels(10, 8, 0)], channels=4), torch.zeros(1), torch.zeros(1, 2, 64))
    with pytest.raises(InputError):  # outside the latent grid
        model(batch_of([voxels(10, 8, 0) * 5]), torch.zeros(1), torch.zeros(1, 2, 64))


def test_other_io_layouts_run_and_start_at_zero():
    # two io stages (patch 4) with one block each, and none at all (patch 1): the U-Net wiring holds for any layout
    x = batch_of([voxels(40, 8, 1), voxels(25, 8, 2)])
    t, cond = torch.tensor([1.0, 999.0]), torch.randn(2, 2, 64)
    for overrides in ({"io_block_channels": [16, 32], "patch_size": 4, "num_io_res_blocks": 1},
                      {"io_block_channels": [], "patch_size": 1}):
        model = SLatFlow(get_slat_flow_config("tiny", **overrides))
        assert torch.equal(model(x, t, cond).feats, torch.zeros(65, 8))
        out = perturb(model)(x, t, cond)
        assert out.shape == (65, 8) and torch.isfinite(out.feats).all() and out.feats.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    ref = perturb(SLatFlow("tiny"))
    ckpt = SLatFlow(get_slat_flow_config("tiny", use_checkpoint=True))
    ckpt.load_state_dict(ref.state_dict())
    assert all(block.use_checkpoint for block in ckpt.blocks)
    x = batch_of([voxels(30, 8, 3), voxels(45, 8, 4)])
    t, cond = torch.tensor([100.0, 700.0]), torch.randn(2, 3, 64)
    grads = []
    for m in (ref, ckpt):
        m.zero_grad()
        out = m(x, t, cond)
        out.feats.square().sum().backward()
        grads.append((out.feats.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))


def test_tiny_slat_flow_overfits_a_fixed_velocity():
    torch.manual_seed(0)
    flow = RectifiedFlow()
    model = SLatFlow("tiny")
    x0 = batch_of([voxels(24, 6, 10), voxels(36, 6, 11)])
    cond = torch.randn(2, 4, 64)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        # the same per-item seeds every step: one fixed (x_t, t, target velocity) per structure to memorise
        out = flow.loss(model, x0, cond, [torch.Generator().manual_seed(s) for s in (5, 6)], cond_drop=0.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])

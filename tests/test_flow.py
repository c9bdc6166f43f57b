"""Rectified flow, the Euler sampler with guidance wrappers, the adaLN-Zero blocks and the structure flow."""

import json
import math

import pytest
import torch

from sparseflex.errors import InputError, OptionError
from sparseflex.models import (STRUCTURE_FLOW_CONFIGS, RectifiedFlow, StructureFlow, StructureFlowConfig,
                               get_structure_flow_config, read_structure_flow_config)
from sparseflex.models.structure_flow import patchify, unpatchify
from sparseflex.nn import (ModulatedTransformerCrossBlock, MultiHeadAttention, MultiHeadRMSNorm, SparseTensor,
                           from_padded, to_padded)
from sparseflex.pipelines import (classifier_free_guidance, euler_sample, gaussian_noise, guidance_interval,
                                  guided_velocity, model_velocity, shift_time, time_grid)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models: on a shared machine a second thread mostly adds wake-up latency to every op."""


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def sparse_items(lengths, channels, dtype=torch.float64):
    """A SparseTensor whose item b has lengths[b] rows (distinct voxels along x)."""
    coords = torch.cat([torch.stack([torch.full((n,), b), torch.arange(n), torch.zeros(n, dtype=torch.long),
                                     torch.zeros(n, dtype=torch.long)], 1) for b, n in enumerate(lengths)])
    return SparseTensor(coords, torch.randn(len(coords), channels, dtype=dtype), len(lengths))


def perturb(module, std=0.1):
    """Give the zero-initialised layers (adaLN, cross-attention output, output head) random weights."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "adaLN_modulation" in name or "cross_attn.to_out" in name or "final_layer.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


# ---- rectified flow -------------------------------------------------------------------------------------------


def test_interpolation_endpoints_and_formula():
    flow = RectifiedFlow()
    x0, eps = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    # t = 0: the data plus the noise floor sigma_min eps (exactly x0 without it); t = 1: pure noise
    assert torch.allclose(flow.interpolate(x0, eps, torch.zeros(3)), x0 + 1e-5 * eps, atol=1e-7)
    assert torch.equal(RectifiedFlow(sigma_min=0.0).interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.allclose(flow.interpolate(x0, eps, torch.ones(3)), eps, atol=1e-6)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t = flow.interpolate(x0, eps, t)
    assert torch.allclose(x_t[1], 0.7 * x0[1] + (1e-5 + 0.99999 * 0.3) * eps[1], atol=1e-6)  # t per item
    assert RectifiedFlow(sigma_min=0.0).interpolate(x0, eps, torch.full((3,), 0.5)).allclose(0.5 * (x0 + eps))


def test_velocity_target_is_the_time_derivative_of_the_path():
    flow = RectifiedFlow(sigma_min=0.01)
    x0, eps = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    v = flow.velocity_target(x0, eps)
    for t in (0.1, 0.5, 0.9):
        h = 1e-4
        tp, tm = torch.full((2,), t + h, dtype=torch.float64), torch.full((2,), t - h, dtype=torch.float64)
        fd = (flow.interpolate(x0, eps, tp) - flow.interpolate(x0, eps, tm)) / (2 * h)
        assert torch.allclose(fd, v, atol=1e-9)
    assert torch.allclose(v, 0.99 * eps - x0)


def test_t_is_logit_normal():
    flow = RectifiedFlow()
    t = flow.sample_t(20000, torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 1.0) < 0.03 and abs(float(logit.std()) - 1.0) < 0.03
    t2 = RectifiedFlow(t_mean=-0.5, t_std=0.5).sample_t(20000, torch.Generator().manual_seed(0))
    logit2 = torch.log(t2 / (1 - t2))
    assert abs(float(logit2.mean()) + 0.5) < 0.02 and abs(float(logit2.std()) - 0.5) < 0.02


def oracle(x0_dense, flow, seen):
    """A model that knows x0 and recovers the exact velocity target from x_t and the time it is given."""
    def model_fn(x_t, t1000, cond):
        seen.append(t1000.clone())
        t = (t1000 / 1000).to(torch.float64)
        feats = x_t.feats if isinstance(x_t, SparseTensor) else x_t
        if isinstance(x_t, SparseTensor):
            tb = x_t.per_sample(t)[:, None]
        else:
            tb = t.view(-1, *[1] * (feats.dim() - 1))
        eps = (feats - (1 - tb) * x0_dense) / (flow.sigma_min + (1 - flow.sigma_min) * tb)
        v = (1 - flow.sigma_min) * eps - x0_dense
        return x_t.replace(v) if isinstance(x_t, SparseTensor) else v
    return model_fn


def test_loss_of_the_exact_velocity_is_zero_dense_and_sparse():
    flow = RectifiedFlow()
    x0 = torch.randn(3, 2, 4, 4, 4, dtype=torch.float64)
    seen = []
    out = flow.loss(oracle(x0, flow, seen), x0, None, gens([1, 2, 3]))
    assert float(out.loss) < 1e-20 and out.per_item.shape == (3,)
    assert torch.allclose(seen[0], 1000 * out.t)  # the model sees 1000 t
    sp = sparse_items([5, 1, 9], 3)
    out = flow.loss(oracle(sp.feats, flow, []), sp, None, gens([4, 5, 6]))
    assert float(out.loss) < 1e-20 and out.per_item.shape == (3,)


def test_loss_of_a_zero_model_is_the_target_energy():
    flow = RectifiedFlow()
    x0 = torch.zeros(2, 8, 16, 16, 16)
    out = flow.loss(lambda x, t, c: torch.zeros_like(x), x0, None, gens([7, 8]))
    # target = (1 - sigma_min) eps with eps ~ N(0, 1) over 32768 values per item: mean square ~ 1
    assert torch.allclose(out.per_item, torch.ones(2), atol=0.03)
    assert torch.isclose(out.loss, out.per_item.mean())
    bins = out.by_t_bin(10)
    assert set(bins) == {min(int(t * 10), 9) for t in out.t.tolist()}


def test_condition_dropout_rate_and_unconditional_input():
    flow = RectifiedFlow()
    n = 4000
    x0 = torch.randn(n, 1)
    cond = torch.randn(n, 3, 2) + 5.0
    seen = {}

    def model_fn(x, t, c):
        seen["cond"] = c
        return x

    out = flow.loss(model_fn, x0, cond, gens(range(n)))
    rate = float(out.dropped.float().mean())
    assert 0.085 < rate < 0.115  # 10 % +- 3 standard deviations
    got = seen["cond"]
    assert bool((got[out.dropped] == 0).all()) and torch.equal(got[~out.dropped], cond[~out.dropped])
    # a custom unconditional input, and the two extremes of the rate
    uncond = torch.full((1, 3, 2), -7.0)
    out = flow.loss(model_fn, x0[:50], cond[:50], gens(range(50)), cond_drop=1.0, uncond=uncond)
    assert bool(out.dropped.all()) and bool((seen["cond"] == -7).all())
    out = flow.loss(model_fn, x0[:50], cond[:50], gens(range(50)), cond_drop=0.0)
    assert not bool(out.dropped.any()) and torch.equal(seen["cond"], cond[:50])


def test_per_item_generators_make_the_loss_independent_of_the_batch_split():
    flow = RectifiedFlow()
    cfg = get_structure_flow_config("tiny", resolution=4)
    model = perturb(StructureFlow(cfg)).double().eval()
    x0 = torch.randn(4, 8, 4, 4, 4, dtype=torch.float64)
    cond = torch.randn(4, 5, 64, dtype=torch.float64)
    seeds = [31, 32, 33, 34]
    whole = flow.loss(model, x0, cond, gens(seeds), cond_drop=0.5)
    halves = [flow.loss(model, x0[s], cond[s], gens(seeds[s]), cond_drop=0.5) for s in (slice(0, 2), slice(2, 4))]
    assert torch.allclose(whole.per_item, torch.cat([h.per_item for h in halves]), atol=1e-12)
    assert torch.equal(whole.t, torch.cat([h.t for h in halves]))
    assert torch.equal(whole.dropped, torch.cat([h.dropped for h in halves]))
    assert torch.isclose(whole.loss, (halves[0].loss + halves[1].loss) / 2)
    # a sparse batch: each item's numbers depend on its own generator and rows only
    sp = sparse_items([6, 2, 4], 3)

    def linear(x, t, c):
        return x.replace(x.feats * 0.5 + x.per_sample(t / 1000)[:, None])

    whole = flow.loss(linear, sp, None, gens([1, 2, 3]))
    for b, rows in enumerate(sp.layout):
        one = SparseTensor(sp.coords[rows].clone().index_fill_(1, torch.tensor([0]), 0), sp.feats[rows], 1)
        single = flow.loss(linear, one, None, gens([b + 1]))
        assert torch.allclose(single.per_item, whole.per_item[b:b + 1], atol=1e-12)
    with pytest.raises(InputError):
        flow.loss(linear, sp, None, gens([1, 2]))


# ---- sampler --------------------------------------------------------------------------------------------------


def test_time_shift_and_grid():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0):
        st = shift_time(t, s)
        assert float(st[0]) == 0.0 and float(st[-1]) == 1.0 and bool((st[1:] > st[:-1]).all())
        assert torch.allclose(shift_time(st, 1 / s), t, atol=1e-12)  # shifting by s then 1/s is the identity
    assert torch.equal(shift_time(t, 1.0), t)
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    grid = time_grid(4, 3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == 5
    assert grid == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])  # 3 t / (1 + 2 t) at t = 1, .75, .5, .25, 0
    with pytest.raises(OptionError):
        time_grid(0)


def gaussian_velocity(mu, s, sigma_min):
    """E[v | x_t] for x0 ~ N(mu, s^2) and eps ~ N(0, 1) (independent): x_t and v are jointly Gaussian, so
    E[v | x_t] = E[v] + Cov(v, x_t) / Var(x_t) (x_t - E[x_t]) with a = 1 - t, b = sigma_min + (1 - sigma_min) t:
    E[v] = -mu, E[x_t] = a mu, Var(x_t) = a^2 s^2 + b^2, Cov(v, x_t) = (1 - sigma_min) b - a s^2."""
    def model(x, t1000, cond):
        t = (t1000 / 1000).to(x.dtype)[:, None]
        a, b = 1 - t, sigma_min + (1 - sigma_min) * t
        k = ((1 - sigma_min) * b - a * s ** 2) / (a ** 2 * s ** 2 + b ** 2)
        return -mu + k * (x - a * mu)
    return model


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_maps_noise_to_the_gaussian_data_distribution(shift):
    mu = torch.tensor([2.0, -1.0], dtype=torch.float64)
    s = torch.tensor([0.5, 1.5], dtype=torch.float64)
    sigma_min = 1e-5
    z = gaussian_noise((20000, 2), seed=0, dtype=torch.float64)
    velocity = model_velocity(gaussian_velocity(mu, s, sigma_min), None)
    # the exact flow is affine: x(t) = a mu + sqrt(a^2 s^2 + b^2) z, so x(0) = mu + sqrt(s^2 + sigma_min^2) z
    exact = mu + torch.sqrt(s ** 2 + sigma_min ** 2) * z
    x = euler_sample(velocity, z, steps=400, shift=shift)
    err = float((x - exact).abs().max())
    assert err < 0.03
    # and the samples are N(mu, s^2): mean and std within 4 standard errors (20000 samples)
    assert torch.allclose(x.mean(0), mu, atol=0.045) and torch.allclose(x.std(0), s, atol=0.03)
    # Euler is first order: a quarter of the steps gives four times the error, so it converges to the exact map
    coarse = float((euler_sample(velocity, z, steps=100, shift=shift) - exact).abs().max())
    assert 3.5 < coarse / err < 4.5


@pytest.mark.parametrize("steps", [1, 3, 17])
def test_euler_is_exact_on_straight_paths(steps):
    z = gaussian_noise((50, 3), seed=1, dtype=torch.float64)
    c = torch.tensor([0.3, -2.0, 1.0], dtype=torch.float64)
    # a constant field: x(0) = x(1) - c
    x = euler_sample(lambda x, t: c.expand_as(x), z, steps=steps, shift=3.0)
    assert torch.allclose(x, z - c, atol=1e-12)
    # a point mass at mu (s = 0, sigma_min = 0): E[v | x_t] = (x_t - mu) / t, every path a straight line to mu
    mu = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    visited = []

    def on_step(i, n, t, x):
        visited.append(i)
        assert n == steps and torch.allclose(x, (1 - t) * mu + t * z, atol=1e-12)

    x = euler_sample(lambda x, t: (x - mu) / t, z, steps=steps, shift=2.0, callback=on_step)
    assert torch.allclose(x, mu.expand_as(x), atol=1e-12) and visited == list(range(1, steps + 1))


class Recorder:
    """A toy conditional model recording which conditions and times it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t1000, cond):
        self.calls.append((float(cond.flatten()[0]), float(t1000[0]) / 1000))
        return torch.sin(x) * cond.mean() + t1000[:, None] / 1000


def test_guidance_one_is_the_conditional_model_alone():
    x = torch.randn(4, 3)
    cond, uncond = torch.ones(4, 2), torch.zeros(4, 2)
    model = Recorder()
    v = classifier_free_guidance(model_velocity(model, cond), model_velocity(model, uncond), 1.0)(x, 0.4)
    assert torch.equal(v, model_velocity(model, cond)(x, 0.4))
    assert [c for c, _ in model.calls] == [1.0, 1.0]  # the unconditional branch never ran


def test_guidance_formula_and_trellis_convention():
    x = torch.randn(4, 3)
    cond, uncond = torch.full((4, 2), 2.0), torch.full((4, 2), -1.0)
    model = Recorder()
    v_c, v_u = model(x, torch.full((4,), 300.0), cond), model(x, torch.full((4,), 300.0), uncond)
    g = 3.5
    v = guided_velocity(model, cond, uncond, guidance=g)(x, 0.3)
    assert torch.allclose(v, v_u + g * (v_c - v_u))
    w = g - 1  # TRELLIS' cfg_strength
    assert torch.allclose(v, (1 + w) * v_c - w * v_u, atol=1e-6)
    # default unconditional input: zeros shaped like the condition
    assert torch.allclose(guided_velocity(model, cond, guidance=g)(x, 0.3),
                          g * v_c + (1 - g) * model(x, torch.full((4,), 300.0), torch.zeros(4, 2)))


def test_guidance_interval_evaluates_the_unconditional_model_only_inside():
    model = Recorder()
    cond, uncond = torch.ones(1, 2), torch.zeros(1, 2)
    v_c = model_velocity(model, cond)
    v = guidance_interval(classifier_free_guidance(v_c, model_velocity(model, uncond), 5.0), v_c, (0.3, 0.7))
    euler_sample(v, torch.randn(2, 3), steps=10, shift=1.0)
    grid = time_grid(10, 1.0)[:-1]
    cond_times = [t for c, t in model.calls if c == 1.0]
    uncond_times = [t for c, t in model.calls if c == 0.0]
    assert cond_times == pytest.approx(grid)  # the conditional model runs at every step
    assert uncond_times == pytest.approx([t for t in grid if 0.3 - 1e-9 <= t <= 0.7 + 1e-9])
    assert len(uncond_times) == 5
    with pytest.raises(OptionError):
        guidance_interval(v, v_c, (0.8, 0.2))


def test_sampling_a_structure_flow_is_deterministic_per_seed():
    model = perturb(StructureFlow("tiny")).eval()
    cond = torch.randn(1, 6, 64)
    shape = (2, 8, 8, 8, 8)
    ticks = []

    def run(seed, callback=None):
        return euler_sample(guided_velocity(model, cond, guidance=3.5, interval=(0.5, 1.0)),
                            gaussian_noise(shape, seed), steps=4, callback=callback)

    a = run(0, lambda i, n, t, x: ticks.append(i))
    assert a.shape == shape and bool(torch.isfinite(a).all()) and ticks == [1, 2, 3, 4]
    assert torch.equal(a, run(0)) and not torch.allclose(a, run(1))
    assert not torch.allclose(a, gaussian_noise(shape, 0))  # the model moved the noise


# ---- blocks -----------------------------------------------------------------------------------------------------


def test_fresh_block_is_the_identity_and_its_zero_layers_learn():
    block = ModulatedTransformerCrossBlock(16, 12, 2)
    x, emb, ctx = torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 3, 12)
    assert torch.equal(block(x, emb, ctx), x)
    block(x, emb, ctx).square().sum().backward()
    # adaLN-Zero: the zero layers get gradients (so training opens the gates); nothing behind them does yet
    assert float(block.adaLN_modulation[1].weight.grad.abs().sum()) > 0
    assert float(block.cross_attn.to_out.weight.grad.abs().sum()) > 0
    assert float(block.mlp.mlp[0].weight.grad.abs().sum()) == 0


def test_rms_norm_and_attention_match_a_direct_computation():
    norm = MultiHeadRMSNorm(4, 3)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 2.0)
    q = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    y = norm.double()(q)
    assert torch.allclose(y / norm.gamma, q / q.square().mean(-1, keepdim=True).sqrt(), atol=1e-12)

    attn = MultiHeadAttention(6, 3, qk_rms_norm=True).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    qkv = attn.to_qkv(x).view(2, 5, 3, 3, 2)
    qq, kk, vv = attn.q_rms_norm(qkv[:, :, 0]), attn.k_rms_norm(qkv[:, :, 1]), qkv[:, :, 2]
    weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", qq, kk) / math.sqrt(2), dim=-1)
    expected = attn.to_out(torch.einsum("bhnm,bmhd->bnhd", weights, vv).reshape(2, 5, 6))
    assert torch.allclose(attn(x), expected, atol=1e-12)


def test_padding_mask_equals_attention_on_the_unpadded_items():
    torch.manual_seed(1)
    block = perturb(ModulatedTransformerCrossBlock(8, 6, 2, qk_rms_norm_cross=True)).double()
    sp = sparse_items([3, 7, 1], 8)
    tokens, mask = to_padded(sp)
    assert tokens.shape == (3, 7, 8) and mask.sum(1).tolist() == [3, 7, 1]
    assert torch.equal(from_padded(tokens, mask), sp.feats)
    ctx_len = [4, 2, 5]
    ctx = torch.randn(3, 5, 6, dtype=torch.float64)
    ctx_mask = torch.arange(5)[None] < torch.tensor(ctx_len)[:, None]
    ctx = ctx.masked_fill(~ctx_mask[..., None], 1e3)  # garbage in the padding must not matter
    tokens = tokens.masked_fill(~mask[..., None], -1e3)
    emb = torch.randn(3, 8, dtype=torch.float64)
    out = from_padded(block(tokens, emb, ctx, mask, ctx_mask), mask)
    for b, rows in enumerate(sp.layout):
        alone = block(sp.feats[rows][None], emb[b:b + 1], ctx[b:b + 1, :ctx_len[b]])[0]
        assert torch.allclose(out[rows], alone, atol=1e-10)
    assert not torch.allclose(out, sp.feats)  # the perturbed block does something


# ---- structure flow ---------------------------------------------------------------------------------------------


def test_fresh_structure_flow_outputs_zeros():
    for final_adaln in (False, True):
        model = StructureFlow(get_structure_flow_config("tiny", final_adaln=final_adaln))
        out = model(torch.randn(2, 8, 8, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 3, 64))
        assert out.shape == (2, 8, 8, 8, 8) and torch.equal(out, torch.zeros_like(out))


def trellis_block_params(c, cc, heads, mlp):
    # TRELLIS' ModulatedTransformerCrossBlock with qk RMS norm on self-attention, counted from its layer list
    self_attn = 3 * c * c + 3 * c + c * c + c + 2 * c
    cross = c * c + c + 2 * c * cc + 2 * c + c * c + c
    ffn = 2 * mlp * c * c + mlp * c + c
    return self_attn + 2 * c + cross + ffn + 6 * c * c + 6 * c


def test_trellis_preset_on_the_meta_device():
    cfg = STRUCTURE_FLOW_CONFIGS["trellis"]
    assert (cfg.num_blocks, cfg.model_channels, cfg.num_heads, cfg.mlp_ratio, cfg.cond_channels,
            cfg.resolution, cfg.patch_size, cfg.qk_rms_norm) == (24, 1024, 16, 4.0, 1024, 16, 1, True)
    with torch.device("meta"):
        model = StructureFlow("trellis")
        out = model(torch.empty(2, 8, 16, 16, 16), torch.empty(2), torch.empty(2, 1374, 1024))
    count = sum(p.numel() for p in model.parameters())
    print(f"\nstructure flow 'trellis': {count:,} parameters")
    c = 1024
    expected = (256 * c + c + c * c + c) + (8 * c + c) + 24 * trellis_block_params(c, c, 16, 4) + (8 * c + 8)
    assert count == expected == 555_543_560
    assert out.shape == (2, 8, 16, 16, 16)


def test_config_round_trip_and_validation(tmp_path):
    for name, cfg in STRUCTURE_FLOW_CONFIGS.items():
        d = json.loads(json.dumps(cfg.to_dict()))
        assert StructureFlowConfig.from_dict(d) == cfg
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
        assert read_structure_flow_config(str(tmp_path / f"{name}.json")) == read_structure_flow_config(name) == cfg
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(OptionError):
        read_structure_flow_config(str(tmp_path / "bad.json"))
    assert get_structure_flow_config("small", num_blocks=3).num_blocks == 3
    with pytest.raises(OptionError):
        StructureFlowConfig.from_dict({"bogus": 1})
    with pytest.raises(OptionError):
        get_structure_flow_config("tiny", patch_size=3)
    with pytest.raises(OptionError):
        get_structure_flow_config("huge")
    model = StructureFlow("tiny")
    with pytest.raises(InputError):
        model(torch.randn(1, 8, 4, 4, 4), torch.zeros(1), torch.zeros(1, 2, 64))
    with pytest.raises(InputError):
        model(torch.randn(1, 8, 8, 8, 8), torch.zeros(1), torch.zeros(1, 2, 32))


def test_patchify_layout():
    x = torch.arange(2 * 3 * 4 ** 3, dtype=torch.float32).view(2, 3, 4, 4, 4)
    tok = patchify(x, 1)
    assert tok.shape == (2, 64, 3) and torch.equal(tok[1, 1 * 16 + 2 * 4 + 3], x[1, :, 1, 2, 3])
    tok2 = patchify(x, 2)
    # patch (1, 0, 1) holds cells (2..3, 0..1, 2..3); channels ordered (c, i, j, k)
    assert tok2.shape == (2, 8, 24) and tok2[0, 1 * 4 + 0 * 2 + 1, 2 * 8 + 1 * 4 + 0 * 2 + 1] == x[0, 2, 3, 0, 3]
    assert torch.equal(unpatchify(tok2, 2, 2), x)
    model = StructureFlow(get_structure_flow_config("tiny", patch_size=2))
    assert perturb(model)(x.new_zeros(1, 8, 8, 8, 8), torch.zeros(1), torch.zeros(1, 1, 64)).shape == (1, 8, 8, 8, 8)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    ref = perturb(StructureFlow(get_structure_flow_config("tiny", resolution=4)))
    ckpt = StructureFlow(get_structure_flow_config("tiny", resolution=4, use_checkpoint=True))
    ckpt.load_state_dict(ref.state_dict())
    x, t, cond = torch.randn(2, 8, 4, 4, 4), torch.tensor([100.0, 700.0]), torch.randn(2, 3, 64)
    grads = []
    for m in (ref, ckpt):
        m.zero_grad()
        out = m(x, t, cond)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))


def test_tiny_structure_flow_overfits_one_target():
    torch.manual_seed(0)
    flow = RectifiedFlow()
    model = StructureFlow(get_structure_flow_config("tiny", resolution=4))
    x0 = torch.randn(2, 8, 4, 4, 4)
    cond = torch.randn(2, 4, 64)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        # the same seeds every step: one fixed (x_t, t, target) to memorise
        out = flow.loss(model, x0, cond, gens([5, 6]), cond_drop=0.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])

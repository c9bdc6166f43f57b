"""Window / full / cross attention against naive masked softmax attention written out per sample."""

import math

import pytest
import torch

from sparseflex.errors import InputError, OptionError
from sparseflex.nn import (SparseCrossAttention, SparseFullSelfAttention, SparseTensor, SparseWindowSelfAttention,
                           VarlenPlan, window_ids)
from sparseflex.sparse import dense_grid


pytestmark = pytest.mark.usefixtures("one_thread")


def random_sparse(batch, res, density, channels, dtype=torch.float64):
    coords = torch.cat([dense_grid(res) + torch.tensor([b, 0, 0, 0]) for b in range(batch)])
    coords = coords[torch.rand(len(coords)) < density]
    return SparseTensor(coords, torch.randn(len(coords), channels, dtype=dtype), batch)


def naive_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d)) v over heads, ``allowed [n, n]`` boolean; q, k, v: [n, H, D]."""
    scores = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)


def naive_self_attention(layer, x, window=None, shift=0):
    """Per sample, every pair of voxels whose window ids (computed here with Python integer division) agree."""
    n, h = len(x), layer.num_heads
    qkv = layer.to_qkv(x.feats).view(n, 3, h, -1)
    out = torch.empty(n, h, qkv.shape[-1], dtype=x.dtype)
    for b in range(x.batch_size):
        rows = (x.coords[:, 0] == b).nonzero().squeeze(1)
        if window is None:
            allowed = torch.ones(len(rows), len(rows), dtype=torch.bool)
        else:
            ids = [tuple((int(c) + shift) // window for c in xyz) for xyz in x.coords[rows, 1:]]
            allowed = torch.tensor([[a == b_ for b_ in ids] for a in ids], dtype=torch.bool)
        out[rows] = naive_attention(qkv[rows, 0], qkv[rows, 1], qkv[rows, 2], allowed)
    return layer.to_out(out.reshape(n, -1))


@pytest.mark.parametrize("window,shift", [(4, 0), (4, 2), (8, 4), (3, 1)])
def test_window_attention_equals_masked_attention(window, shift, device):
    x = random_sparse(2, 11, 0.3, 8)
    layer = SparseWindowSelfAttention(8, 2, window, shift).double()
    expected = naive_self_attention(layer, x, window, shift)
    assert torch.allclose(layer.to(device)(x.to(device)).feats.cpu(), expected, atol=1e-12)


@pytest.mark.parametrize("granularity", [0, 1, 2, 16])
def test_bucketed_plan_with_padding_equals_masked_attention(granularity):
    # coarse buckets pad many windows, exercising the key mask
    x = random_sparse(2, 10, 0.4, 6)
    keys = window_ids(x.coords, 4, 1)
    plan = VarlenPlan(keys, granularity)
    if granularity in (1, 2):
        assert any(mask is not None for _, _, mask in plan.buckets)
    q, k, v = (torch.randn(len(x), 3, 2, dtype=torch.float64) for _ in range(3))
    allowed = keys[:, None] == keys[None]
    assert torch.allclose(plan.attend(q, k, v), naive_attention(q, k, v, allowed), atol=1e-12)


def test_window_ids_are_shifted_floor_not_cyclic():
    coords = torch.tensor([[0, 3, 0, 0], [0, 4, 0, 0], [0, 11, 0, 0], [0, 12, 0, 0], [0, 0, 0, 0], [0, 15, 0, 0],
                           [1, 4, 0, 0]])
    ids = window_ids(coords, 8, 4).tolist()
    assert ids[0] == ids[4] != ids[1]  # 3 and 0 share floor(x + 4 / 8) = 0, 4 starts window 1
    assert ids[1] == ids[2] != ids[3]  # 4..11 form window 1, 12 starts window 2
    assert ids[3] == ids[5] != ids[4]  # 12..15 (a partial edge window) does not wrap round to 0
    assert ids[6] != ids[1]  # other batch item


def test_full_attention_equals_per_sample_attention(device):
    x = random_sparse(3, 5, 0.3, 8)
    layer = SparseFullSelfAttention(8, 4).double()
    expected = naive_self_attention(layer, x)
    assert torch.allclose(layer.to(device)(x.to(device)).feats.cpu(), expected, atol=1e-12)


def test_results_independent_of_voxel_order():
    x = random_sparse(2, 10, 0.3, 8)
    perm = torch.randperm(len(x))
    shuffled, order = SparseTensor.from_unsorted(x.coords[perm], x.feats[perm], x.batch_size)
    for layer in (SparseWindowSelfAttention(8, 2, 4, 2).double(), SparseFullSelfAttention(8, 2).double()):
        y = layer(shuffled).feats
        back = torch.empty_like(y)
        back[perm[order]] = y
        assert torch.allclose(back, layer(x).feats, atol=1e-12)


def test_batch_items_never_mix():
    x = random_sparse(1, 8, 0.4, 8)
    both = SparseTensor(torch.cat([x.coords, x.coords + torch.tensor([1, 0, 0, 0])]),
                        torch.cat([x.feats, torch.randn_like(x.feats) * 10]))
    context = torch.randn(2, 5, 3, dtype=torch.float64)
    for layer in (SparseWindowSelfAttention(8, 2, 4).double(), SparseFullSelfAttention(8, 2).double()):
        assert torch.allclose(layer(both).feats[:len(x)], layer(x).feats, atol=1e-12)
    cross = SparseCrossAttention(8, 3, 2).double()
    assert torch.allclose(cross(both, context).feats[:len(x)], cross(x, context[:1]).feats, atol=1e-12)


def test_cross_attention_equals_per_sample_attention(device):
    x = random_sparse(3, 4, 0.4, 8)
    context = torch.randn(3, 7, 5, dtype=torch.float64)
    layer = SparseCrossAttention(8, 5, 2).double()
    q = layer.to_q(x.feats).view(len(x), 2, 4)
    kv = layer.to_kv(context).view(3, 7, 2, 2, 4)
    out = torch.empty_like(q)
    for b in range(3):
        rows = x.coords[:, 0] == b
        out[rows] = naive_attention(q[rows], kv[b, :, 0], kv[b, :, 1], torch.ones(int(rows.sum()), 7, dtype=torch.bool))
    expected = layer.to_out(out.reshape(len(x), 8))
    assert torch.allclose(layer.to(device)(x.to(device), context.to(device)).feats.cpu(), expected, atol=1e-12)
    with pytest.raises(InputError):
        layer(x.to(device), context[:2].to(device))


def test_gradients_match_finite_differences():
    x = random_sparse(2, 4, 0.35, 4)
    context = torch.randn(2, 3, 3, dtype=torch.float64)
    window = SparseWindowSelfAttention(4, 2, 2, 1).double()
    full = SparseFullSelfAttention(4, 2).double()
    cross = SparseCrossAttention(4, 3, 2).double()
    feats = x.feats.clone().requires_grad_()
    ctx = context.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: window(x.replace(f)).feats, (feats,))
    assert torch.autograd.gradcheck(lambda f: full(x.replace(f)).feats, (feats,))
    assert torch.autograd.gradcheck(lambda f, c: cross(x.replace(f), c).feats, (feats, ctx))
    # and the projection weights of the windowed layer
    w = window.to_qkv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda wq: torch.func.functional_call(window, {"to_qkv.weight": wq}, (x,)).feats, (w,))


def test_window_plan_is_cached_per_shift():
    x = random_sparse(1, 8, 0.5, 4, torch.float32)
    SparseWindowSelfAttention(4, 1, 8, 0)(x)
    SparseWindowSelfAttention(4, 1, 8, 4)(x.replace(x.feats + 1))
    assert ("window", 8, 0) in x.cache and ("window", 8, 4) in x.cache


# -- the batched layouts (pow2 buckets, varlen, padded cross-attention) against the per-bucket reference ---------------
from sparseflex.nn import attention as attention_mod  # noqa: E402


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k):
    """Stand-in for torch's CUDA-only varlen kernel: group i is q rows cu_q[i]:cu_q[i+1] on k, v rows
    cu_k[i]:cu_k[i+1], written out with the naive attention above."""
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and cu_q.dtype == torch.int32
    out = torch.zeros_like(q)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    assert max_q == max(b - a for a, b in zip(bounds_q, bounds_q[1:]))
    assert max_k == max(b - a for a, b in zip(bounds_k, bounds_k[1:]))
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        out[q0:q1] = naive_attention(q[q0:q1], k[k0:k1], v[k0:k1], allowed)
    return out


def irregular_windows():
    """Windows of very different sizes: a dense block (full 4^3 windows), a sparse sprinkle, and single voxels."""
    dense = dense_grid(8)
    sprinkle = dense_grid(16)[torch.rand(16 ** 3) < 0.05] + torch.tensor([0, 8, 0, 0])
    singles = torch.tensor([[0, 30, 30, 30], [0, 40, 0, 0], [1, 1, 2, 3]])
    coords = torch.unique(torch.cat([dense, sprinkle, singles]), dim=0)
    coords = coords[torch.argsort(coords[:, 0], stable=True)]
    return SparseTensor(coords, torch.randn(len(coords), 8, dtype=torch.float64))


def fwd_bwd(fn, *inputs):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*xs)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return out.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("backend", ["pow2", "varlen"])
@pytest.mark.parametrize("window,shift", [(4, 0), (4, 2), (8, 0), (8, 4)])
def test_batched_window_layouts_equal_the_per_bucket_reference(monkeypatch, backend, window, shift):
    monkeypatch.setattr(attention_mod, "_varlen_kernel", varlen_reference)
    x = irregular_windows()
    keys = window_ids(x.coords, window, shift)
    plan = VarlenPlan(keys)
    lengths = torch.unique(keys, return_counts=True)[1]
    # the irregular sizes this test is about: single voxels to full windows, many distinct lengths
    assert lengths.min() == 1 and lengths.max() >= 64 and len(torch.unique(lengths)) >= 8
    qkv = torch.randn(len(x), 3, 2, 4, dtype=torch.float64)
    with attention_mod.attention_backend("buckets"):
        ref, (ref_grad,) = fwd_bwd(plan.attend_packed, qkv)
    with attention_mod.attention_backend(backend):
        out, (grad,) = fwd_bwd(plan.attend_packed, qkv)
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(grad, ref_grad, atol=1e-12)
    if backend == "pow2":  # few calls: at most one per power of two
        assert len(plan.layout(attention_mod.POW2_GRANULARITY).buckets) <= int(math.log2(window ** 3)) + 1
        assert len(plan.buckets) > len(plan.layout(attention_mod.POW2_GRANULARITY).buckets)
    # and the layers, full attention included
    for layer in (SparseWindowSelfAttention(8, 2, window, shift).double(), SparseFullSelfAttention(8, 2).double()):
        with attention_mod.attention_backend("buckets"):
            ref = layer(x).feats
        with attention_mod.attention_backend(backend):
            assert torch.allclose(layer(x).feats, ref, atol=1e-12)


@pytest.mark.parametrize("backend", ["pow2", "varlen"])
def test_batched_cross_attention_equals_one_call_per_sample(monkeypatch, backend):
    monkeypatch.setattr(attention_mod, "_varlen_kernel", varlen_reference)
    x = random_sparse(3, 5, 0.5, 8)
    x = x.select(torch.cat([torch.arange(3), (x.coords[:, 0] > 0).nonzero().squeeze(1)]))  # sample 0: 3 voxels
    context = torch.randn(3, 6, 5, dtype=torch.float64)
    layer = SparseCrossAttention(8, 5, 2).double()

    def run(f, c):
        return layer(x.replace(f), c).feats
    with attention_mod.attention_backend("buckets"):
        ref, ref_grads = fwd_bwd(run, x.feats, context)
    with attention_mod.attention_backend(backend):
        out, grads = fwd_bwd(run, x.feats, context)
    assert torch.allclose(out, ref, atol=1e-12)
    assert all(torch.allclose(g, r, atol=1e-12) for g, r in zip(grads, ref_grads))


def test_a_failing_varlen_kernel_falls_back_to_padded_buckets(monkeypatch):
    x = random_sparse(2, 6, 0.5, 8)
    layer = SparseWindowSelfAttention(8, 2, 4, 2).double()
    expected = layer(x).feats

    def broken(*args):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore")
    monkeypatch.setattr(attention_mod, "_varlen_kernel", broken)
    monkeypatch.setattr(attention_mod, "_varlen_failed", False)
    monkeypatch.setattr(attention_mod, "_resolve", lambda qkv: "varlen")  # as auto would choose on a GPU
    with pytest.warns(RuntimeWarning, match="varlen attention failed .*Ampere"):
        out = layer(x).feats
    assert attention_mod._varlen_failed and torch.allclose(out, expected, atol=1e-12)
    with attention_mod.attention_backend("varlen"), pytest.raises(RuntimeError, match="Ampere"):
        layer(x)  # forced: the error surfaces


def test_attention_backend_setting_is_checked():
    with pytest.raises(OptionError):
        attention_mod.set_attention_backend("flash")
    assert attention_mod._backend == "auto"
    with attention_mod.attention_backend("pow2"):
        assert attention_mod._resolve(torch.zeros(1)) == "pow2"
    assert attention_mod._resolve(torch.zeros(1)) == "buckets"  # auto on the CPU: today's fine buckets


def test_varlen_self_check_rejects_a_kernel_without_backward(monkeypatch):
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k):
            return varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k)

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("derivative for _varlen_attn is not implemented")

    monkeypatch.setattr(attention_mod, "_varlen_failed", False)
    attention_mod._varlen_works.cache_clear()
    monkeypatch.setattr(attention_mod, "_varlen_kernel", varlen_reference)
    assert attention_mod._varlen_works(torch.device("cpu"), torch.float64)
    assert not attention_mod._varlen_failed
    attention_mod._varlen_works.cache_clear()
    monkeypatch.setattr(attention_mod, "_varlen_kernel", NoBackward.apply)
    with pytest.warns(RuntimeWarning, match="varlen attention unusable .*not implemented"):
        assert not attention_mod._varlen_works(torch.device("cpu"), torch.float64)
    assert attention_mod._varlen_failed
    attention_mod._varlen_works.cache_clear()

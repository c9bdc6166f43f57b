"""Window / full / cross attention against naive masked softmax attention written out per sample."""

import math

import pytest
import torch

from sparseflex.errors import InputError
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
def test_window_attention_equals_masked_attention(window, shift):
    x = random_sparse(2, 11, 0.3, 8)
    layer = SparseWindowSelfAttention(8, 2, window, shift).double()
    expected = naive_self_attention(layer, x, window, shift)
    assert torch.allclose(layer(x).feats, expected, atol=1e-12)


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


def test_full_attention_equals_per_sample_attention():
    x = random_sparse(3, 5, 0.3, 8)
    layer = SparseFullSelfAttention(8, 4).double()
    assert torch.allclose(layer(x).feats, naive_self_attention(layer, x), atol=1e-12)


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


def test_cross_attention_equals_per_sample_attention():
    x = random_sparse(3, 4, 0.4, 8)
    context = torch.randn(3, 7, 5, dtype=torch.float64)
    layer = SparseCrossAttention(8, 5, 2).double()
    q = layer.to_q(x.feats).view(len(x), 2, 4)
    kv = layer.to_kv(context).view(3, 7, 2, 2, 4)
    out = torch.empty_like(q)
    for b in range(3):
        rows = x.coords[:, 0] == b
        out[rows] = naive_attention(q[rows], kv[b, :, 0], kv[b, :, 1], torch.ones(int(rows.sum()), 7, dtype=torch.bool))
    assert torch.allclose(layer(x, context).feats, layer.to_out(out.reshape(len(x), 8)), atol=1e-12)
    with pytest.raises(InputError):
        layer(x, context[:2])


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

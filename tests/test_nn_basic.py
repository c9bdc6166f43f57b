"""SparseTensor layout and cache, feature-wise layers, per-sample GroupNorm, resampling and embeddings."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseflex.errors import InputError
from sparseflex.nn import (AbsolutePositionEmbedder, SparseGroupNorm, SparseLayerNorm, SparseLinear, SparseTensor,
                           gate, modulate, sincos_position_embedding, sparse_cat, sparse_downsample, sparse_subdivide,
                           sparse_upsample, timestep_embedding)
from sparseflex.sparse import CORNER_OFFSETS, dense_grid


pytestmark = pytest.mark.usefixtures("one_thread")


def random_sparse(batch, res, density, channels, dtype=torch.float64):
    coords = torch.cat([dense_grid(res) + torch.tensor([b, 0, 0, 0]) for b in range(batch)])
    coords = coords[torch.rand(len(coords)) < density]
    return SparseTensor(coords, torch.randn(len(coords), channels, dtype=dtype), batch)


# ---- SparseTensor ---------------------------------------------------------------------------------------------

def test_layout_offsets_and_empty_samples():
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 1], [2, 0, 0, 0]])
    x = SparseTensor(coords, torch.randn(3, 2), batch_size=4)
    assert x.offsets.tolist() == [0, 2, 2, 3, 3]
    assert x.layout == [slice(0, 2), slice(2, 2), slice(2, 3), slice(3, 3)]
    assert [len(f) for f in x.split()] == [2, 0, 1, 0]
    assert x.per_sample(torch.arange(4.0)[:, None]).squeeze(1).tolist() == [0.0, 0.0, 2.0]
    with pytest.raises(InputError):
        SparseTensor(coords, torch.randn(3, 2), batch_size=2)


def test_rows_must_be_sorted_by_batch():
    coords = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1], [1, 2, 2, 2]])
    feats = torch.arange(3.0)[:, None]
    with pytest.raises(InputError):
        SparseTensor(coords, feats)
    x, order = SparseTensor.from_unsorted(coords, feats)
    assert x.coords[:, 0].tolist() == [0, 1, 1]
    assert torch.equal(x.feats, feats[order])
    assert x.feats.squeeze(1).tolist() == [1.0, 0.0, 2.0]  # stable within a sample


def test_bad_inputs_raise():
    with pytest.raises(InputError):
        SparseTensor(torch.zeros(3, 4).long(), torch.zeros(2, 5))
    with pytest.raises(InputError):
        SparseTensor(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(InputError):
        SparseTensor(torch.zeros(3, 4).long(), torch.zeros(3))


def test_replace_shares_cache_and_arithmetic_checks_coordinates():
    x = random_sparse(2, 4, 0.5, 3)
    y = x.replace(x.feats * 2)
    assert y.cache is x.cache and y.hash is x.hash
    assert torch.allclose((x + y).feats, 3 * x.feats)
    assert torch.allclose((2 * x - y).feats, torch.zeros_like(x.feats))
    assert sparse_cat([x, y]).shape == (len(x), 6)
    other = random_sparse(2, 4, 0.5, 3)
    with pytest.raises(InputError):
        x + other
    assert x.to(dtype=torch.float32).cache is x.cache


def test_feature_wise_linear_matches_torch():
    x = random_sparse(2, 4, 0.5, 3)
    lin = SparseLinear(3, 5).double()
    assert torch.equal(lin(x).feats, F.linear(x.feats, lin.weight, lin.bias))
    assert torch.equal(lin(x.feats), lin(x).feats)


# ---- normalisation ------------------------------------------------------------------------------------------------

def test_layer_norm_without_affine_matches_formula():
    x = random_sparse(1, 4, 0.6, 16)
    ln = SparseLayerNorm(16, elementwise_affine=False).double()
    assert list(ln.state_dict()) == [] and ln.eps == 1e-6
    f = x.feats
    expected = (f - f.mean(1, keepdim=True)) / torch.sqrt(f.var(1, unbiased=False, keepdim=True) + 1e-6)
    assert torch.allclose(ln(x).feats, expected, atol=1e-12)


def test_group_norm_is_per_sample_torch_group_norm():
    x = random_sparse(3, 5, 0.4, 12)
    x = x.replace(x.feats * torch.tensor([1.0, 5.0, 0.1]).double()[x.batch_index, None] + 3.0 * x.batch_index[:, None])
    gn = SparseGroupNorm(4, 12).double()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    ref = nn.GroupNorm(4, 12).double()
    ref.load_state_dict(gn.state_dict())
    y = gn(x)
    for rows in x.layout:
        expected = ref(x.feats[rows].t()[None])[0].t()
        assert torch.allclose(y.feats[rows], expected, atol=1e-10)


def test_group_norm_with_an_empty_sample():
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [2, 0, 0, 0], [2, 0, 1, 0]])
    x = SparseTensor(coords, torch.randn(5, 4, dtype=torch.float64), batch_size=3)
    y = SparseGroupNorm(2, 4).double()(x).feats
    ref = nn.GroupNorm(2, 4).double()
    assert torch.allclose(y[:3], ref(x.feats[:3].t()[None])[0].t(), atol=1e-12)
    assert torch.allclose(y[3:], ref(x.feats[3:].t()[None])[0].t(), atol=1e-12)


def test_group_norm_precise_with_large_mean_and_gradients():
    x = random_sparse(2, 4, 0.5, 4)
    big = x.replace(x.feats.float() + 1e4)
    y = SparseGroupNorm(2, 4)(big).feats
    assert torch.allclose(y, SparseGroupNorm(2, 4)(x.replace(x.feats.float())).feats, atol=2e-3)
    gn = SparseGroupNorm(2, 4).double()
    feats = x.feats.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: gn(x.replace(f)).feats, (feats,))


# ---- resampling ---------------------------------------------------------------------------------------------------

def test_subdivide_children_follow_corner_order_and_copy_features():
    x = random_sparse(2, 3, 0.5, 2)
    y = sparse_subdivide(x)
    assert len(y) == 8 * len(x) and y.batch_size == 2
    parent = torch.arange(len(x)).repeat_interleave(8)
    child = torch.arange(8).repeat(len(x))
    assert torch.equal(y.coords[:, 1:], 2 * x.coords[parent, 1:] + CORNER_OFFSETS[child])
    assert torch.equal(y.coords[:, 0], x.coords[parent, 0])
    assert torch.equal(y.feats, x.feats[parent])


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_downsample_pools_children_and_upsample_returns(reduce):
    x = random_sparse(2, 6, 0.5, 3)
    y = sparse_downsample(x, 2, reduce)
    groups = {}
    for c, f in zip(x.coords.tolist(), x.feats):
        groups.setdefault((c[0], c[1] // 2, c[2] // 2, c[3] // 2), []).append(f)
    assert len(y) == len(groups)
    for c, f in zip(y.coords.tolist(), y.feats):
        stack = torch.stack(groups[tuple(c)])
        assert torch.allclose(f, stack.mean(0) if reduce == "mean" else stack.max(0).values)
    up = sparse_upsample(y.replace(y.feats * 2), 2)
    assert torch.equal(up.coords, x.coords) and up.cache is x.cache
    lookup = {tuple(c): f for c, f in zip(y.coords.tolist(), y.feats)}
    expected = torch.stack([2 * lookup[(c[0], c[1] // 2, c[2] // 2, c[3] // 2)] for c in x.coords.tolist()])
    assert torch.allclose(up.feats, expected)
    assert torch.equal(sparse_upsample(y, 2, target=x).feats, sparse_upsample(y, 2).feats)


def test_upsample_errors():
    x = random_sparse(1, 4, 0.5, 2)
    with pytest.raises(InputError):
        sparse_upsample(x, 2)
    far = SparseTensor(torch.tensor([[0, 100, 100, 100]]), torch.zeros(1, 2, dtype=torch.float64))
    with pytest.raises(InputError):
        sparse_upsample(sparse_downsample(x), 2, target=far)


# ---- embeddings ---------------------------------------------------------------------------------------------------

def test_position_embedding_spec_layout_768():
    xyz = torch.tensor([[0, 0, 0], [3, 17, 255], [128, 64, 1]])
    emb = sincos_position_embedding(xyz, 768)
    assert emb.shape == (3, 768)
    for n, c in enumerate(xyz.tolist()):
        for axis in range(3):
            for i in (0, 1, 57, 127):
                f = 1 / 10000 ** (i / 128)
                assert emb[n, axis * 256 + i].item() == pytest.approx(math.sin(c[axis] * f), abs=1e-4)
                assert emb[n, axis * 256 + 128 + i].item() == pytest.approx(math.cos(c[axis] * f), abs=1e-4)


def test_position_embedding_other_widths_zero_pad():
    xyz = torch.tensor([[5, 6, 7]])
    emb = sincos_position_embedding(xyz, 100)  # 16 frequencies per axis -> 96 channels, 4 zeros
    assert emb.shape == (1, 100) and torch.equal(emb[0, 96:], torch.zeros(4))
    assert emb[0, 32 + 1].item() == pytest.approx(math.sin(6 / 10000 ** (1 / 16)), abs=1e-6)
    x = SparseTensor(torch.tensor([[0, 5, 6, 7]]), torch.zeros(1, 1))
    assert torch.equal(AbsolutePositionEmbedder(100)(x), emb)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 0.5, 999.0])
    emb = timestep_embedding(t, 9)
    assert emb.shape == (3, 9) and torch.equal(emb[:, 8], torch.zeros(3))
    for n, tv in enumerate(t.tolist()):
        for i in range(4):
            f = math.exp(-math.log(10000) * i / 4)
            assert emb[n, i].item() == pytest.approx(math.cos(tv * f), abs=1e-4)
            assert emb[n, 4 + i].item() == pytest.approx(math.sin(tv * f), abs=1e-4)


def test_modulate_and_gate_per_sample():
    x = random_sparse(2, 3, 0.6, 4)
    shift, scale, g = (torch.randn(2, 4, dtype=torch.float64) for _ in range(3))
    b = x.batch_index
    assert torch.allclose(modulate(x, shift, scale).feats, x.feats * (1 + scale[b]) + shift[b])
    assert torch.allclose(gate(x, g).feats, x.feats * g[b])
    dense = torch.randn(2, 5, 4, dtype=torch.float64)
    assert torch.allclose(modulate(dense, shift, scale), dense * (1 + scale[:, None]) + shift[:, None])

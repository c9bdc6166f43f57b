"""Submanifold sparse convolution against torch's dense Conv3d, finite differences and the checkpoint weight layout."""

import pytest
import torch
import torch.nn.functional as F

from sparseflex.errors import InputError, OptionError
from sparseflex.nn import SparseConv3d, SparseTensor, conv
from sparseflex.sparse import dense_grid


pytestmark = pytest.mark.usefixtures("one_thread")


def random_sparse(batch, res, density, channels, dtype=torch.float32):
    coords = torch.cat([dense_grid(res) + torch.tensor([b, 0, 0, 0]) for b in range(batch)])
    coords = coords[torch.rand(len(coords)) < density]
    return SparseTensor(coords, torch.randn(len(coords), channels, dtype=dtype), batch)


def to_dense(x, res):
    c = x.coords
    dense = x.feats.new_zeros(x.batch_size, x.feats.shape[1], res, res, res)
    dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = x.feats
    return dense


def dense_reference(x, layer, res):
    """torch Conv3d with the permuted kernel on the zero-filled grid, read back at the active voxels."""
    k = layer.kernel_size
    out = F.conv3d(to_dense(x, res), layer.weight.permute(0, 4, 1, 2, 3), layer.bias, padding=k // 2)
    c = x.coords
    return out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


def test_full_grid_equals_dense_conv3d():
    res = 5
    x = random_sparse(2, res, 1.1, 3, torch.float64)  # every voxel of both samples
    layer = SparseConv3d(3, 4).double()
    y = layer(x)
    assert torch.equal(y.coords, x.coords)
    assert torch.allclose(y.feats, dense_reference(x, layer, res), atol=1e-12)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_random_sparse_equals_masked_dense_conv(kernel_size):
    res = 9
    x = random_sparse(3, res, 0.25, 5, torch.float64)
    layer = SparseConv3d(5, 7, kernel_size).double()
    assert torch.allclose(layer(x).feats, dense_reference(x, layer, res), atol=1e-12)


def test_kernel_index_is_neighbour_offset():
    # only kernel entry (2, 1, 0) is set: each voxel reads its neighbour at offset (+1, 0, -1)
    coords = torch.tensor([[0, 3, 3, 3], [0, 4, 3, 2], [0, 4, 3, 3], [1, 4, 3, 2]])
    x = SparseTensor(coords, torch.tensor([[1.0], [10.0], [100.0], [1000.0]]))
    layer = SparseConv3d(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 2, 1, 0, 0] = 1.0
    assert layer(x).feats.squeeze(1).tolist() == [10.0, 0.0, 0.0, 0.0]  # batch 1's (4,3,2) is not batch 0's neighbour


def test_batch_items_never_mix():
    res = 6
    x = random_sparse(1, res, 0.5, 4)
    both = SparseTensor(torch.cat([x.coords, x.coords + torch.tensor([1, 0, 0, 0])]),
                        torch.cat([x.feats, torch.randn_like(x.feats) * 100]))
    layer = SparseConv3d(4, 3)
    alone, together = layer(x).feats, layer(both).feats
    assert torch.allclose(together[:len(x)], alone, atol=1e-5)


def test_result_independent_of_voxel_order():
    x = random_sparse(2, 7, 0.3, 4, torch.float64)
    perm = torch.randperm(len(x))
    shuffled, order = SparseTensor.from_unsorted(x.coords[perm], x.feats[perm], x.batch_size)
    layer = SparseConv3d(4, 6).double()
    y = layer(shuffled).feats
    back = torch.empty_like(y)
    back[perm[order]] = y
    assert torch.allclose(back, layer(x).feats, atol=1e-12)


@pytest.mark.parametrize("dense_fill", [0.0, 0.5, 2.0])
def test_gradients_match_finite_differences(dense_fill):
    # dense_fill 0: every offset by dense gathers; 2: every offset by explicit pairs and index_add
    x = random_sparse(2, 4, 0.6, 3, torch.float64)
    layer = SparseConv3d(3, 2).double()
    plan = conv.ConvPlan(x, 3, dense_fill)
    assert len(plan.dense) == (26 if dense_fill == 0 else 0 if dense_fill > 1 else len(plan.dense))

    def fn(feats, weight, bias):
        return conv._SubmanifoldConv.apply(feats, weight, bias, plan)

    per_offset = layer.weight.detach().reshape(2, 27, 3).permute(1, 2, 0).contiguous()  # [K, in, out]
    inputs = tuple(t.clone().requires_grad_() for t in (x.feats, per_offset, layer.bias.detach()))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dense_fill", [0.0, 0.2, 2.0])
def test_gradients_equal_dense_conv_gradients(monkeypatch, dense_fill):
    # small chunks so the chunked forward and backward loops run several times
    monkeypatch.setattr(conv, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(conv, "DENSE_FILL", dense_fill)
    res = 8
    x = random_sparse(2, res, 0.3, 4, torch.float64)
    feats = x.feats.clone().requires_grad_()
    layer = SparseConv3d(4, 5).double()
    out = layer(x.replace(feats)).feats
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (feats, layer.weight, layer.bias), g)

    feats_d = x.feats.clone().requires_grad_()
    ref = dense_reference(x.replace(feats_d), layer, res)
    rx, rw, rb = torch.autograd.grad(ref, (feats_d, layer.weight, layer.bias), g)
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in ((gx, rx), (gw, rw), (gb, rb)):
        assert torch.allclose(a, b, atol=1e-10)


def test_checkpoint_layout_and_errors():
    layer = SparseConv3d(768, 192)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "conv.weight": (192, 3, 3, 3, 768), "conv.bias": (192,)}
    assert tuple(SparseConv3d(768, 192, 1).weight.shape) == (192, 1, 1, 1, 768)
    with pytest.raises(OptionError):
        SparseConv3d(3, 3, kernel_size=2)
    with pytest.raises(InputError):
        SparseConv3d(3, 3)(random_sparse(1, 3, 1.1, 4))


def test_neighbour_pairs_are_cached_and_shared():
    x = random_sparse(1, 5, 0.5, 2)
    layer = SparseConv3d(2, 2)
    layer(x)
    plan = x.cache[("conv_plan", 3)]
    y = layer(x.replace(x.feats * 2))
    assert y.cache[("conv_plan", 3)] is plan

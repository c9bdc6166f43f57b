"""Kernel orientation against the real spconv (the sparse convolution the TripoSF release runs on).

The parity fixture was produced with the release's spconv calls replaced by index-for-index equivalents, so it
cannot tell whether spconv itself reads kernel index (i, j, k) at offset (i, j, k) - 1 or at its mirror. This test
settles it where spconv and CUDA exist (``pip install spconv-cu120`` or the build matching the CUDA toolkit) and is
skipped elsewhere: a release-layout kernel ``[out, kx, ky, kz, in]`` copied into ``spconv.SubMConv3d`` must give
what :class:`sparseflex.nn.SparseConv3d` computes with the same tensor.
"""

import pytest
import torch

from sparseflex.nn import SparseConv3d, SparseTensor
from sparseflex.sparse import dense_grid

spconv = pytest.importorskip("spconv.pytorch", reason="spconv is not installed (it needs CUDA)")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="spconv's kernels need a CUDA device")


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_submanifold_conv_equals_spconv(kernel_size):
    gen = torch.Generator().manual_seed(0)
    res, cin, cout = 12, 16, 8
    coords = dense_grid(res)
    coords = coords[torch.rand(len(coords), generator=gen) < 0.3]
    feats = torch.randn(len(coords), cin, generator=gen)
    ours = SparseConv3d(cin, cout, kernel_size).cuda()
    ref = spconv.SubMConv3d(cin, cout, kernel_size, bias=True, indice_key="orientation").cuda()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        assert tuple(ref.weight.shape) == tuple(ours.conv.weight.shape)  # the release's [out, kx, ky, kz, in]
        ref.weight.copy_(ours.conv.weight)
        ref.bias.copy_(ours.conv.bias)
        x = SparseTensor(coords.cuda(), feats.cuda())
        got = ours(x).feats
        st = spconv.SparseConvTensor(feats.cuda(), coords.int().cuda(), [res] * 3, 1)
        expected = ref(st).features  # submanifold: rows in input order
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)

"""Transformer blocks: TripoSF key names, the pre-norm formula, activation checkpointing, the modulated cross block."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseflex.nn import (SparseConv3d, SparseGroupNorm, SparseSiLU,
                           SparseTensor, SparseTransformerBlock)
from sparseflex.sparse import dense_grid


pytestmark = pytest.mark.usefixtures("one_thread")


KEYS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "triposf_vae_keys.tsv"


def published(prefix):
    if not KEYS.is_file():
        pytest.skip(f"key list not found at {KEYS}")
    rows = [line.split("\t") for line in KEYS.read_text().splitlines() if line.startswith(prefix)]
    return {k[len(prefix):]: tuple(int(s) for s in shape.strip("[]").split(",")) for k, shape in rows}


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def random_sparse(batch, res, density, channels, dtype=torch.float64):
    coords = torch.cat([dense_grid(res) + torch.tensor([b, 0, 0, 0]) for b in range(batch)])
    coords = coords[torch.rand(len(coords)) < density]
    return SparseTensor(coords, torch.randn(len(coords), channels, dtype=dtype), batch)


def test_block_keys_match_triposf_encoder_and_decoder_blocks():
    block = SparseTransformerBlock(768, 12, shift=4)
    assert shapes(block) == published("encoder.blocks.1.") == published("decoder.blocks.0.")


def test_conv_and_norm_compose_to_triposf_upsample_keys():
    class Head(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(approximate="tanh"), nn.Linear(4 * c, 1))

    up = nn.Module()
    up.act_layers = nn.Sequential(SparseGroupNorm(32, 768), SparseSiLU())
    up.out_layers = nn.Sequential(SparseConv3d(768, 192), SparseGroupNorm(32, 192), SparseSiLU(),
                                  SparseConv3d(192, 192))
    up.skip_connection = SparseConv3d(768, 192, 1)
    up.pruning_head = Head(192)
    assert shapes(up) == published("decoder.upsample.0.")


def explicit_block(block, x):
    """x + attn(LN(x)); x + mlp(LN(x)), with attention written out over each whole sample."""
    def ln(f):
        return (f - f.mean(1, keepdim=True)) / torch.sqrt(f.var(1, unbiased=False, keepdim=True) + 1e-6)

    attn, f, heads = block.attn, x.feats, block.attn.num_heads
    qkv = attn.to_qkv(ln(f)).view(len(f), 3, heads, -1)
    out = torch.empty(len(f), heads, qkv.shape[-1], dtype=f.dtype)
    for rows in x.layout:
        q, k, v = qkv[rows, 0], qkv[rows, 1], qkv[rows, 2]
        w = (torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1])).softmax(-1)
        out[rows] = torch.einsum("hnm,mhd->nhd", w, v)
    f = f + attn.to_out(out.reshape(len(f), -1))
    hidden = F.gelu(block.mlp.mlp[0](ln(f)), approximate="tanh")
    return f + block.mlp.mlp[2](hidden)


def test_block_equals_explicit_formula_and_big_window_equals_full(device):
    x = random_sparse(2, 6, 0.4, 8)
    window = SparseTransformerBlock(8, 2, window_size=16, shift=3).double()  # one window holds each whole sample
    full = SparseTransformerBlock(8, 2, attn_mode="full").double()
    full.load_state_dict(window.state_dict())
    expected = explicit_block(window, x)
    on_device = x.to(device)
    assert torch.allclose(window.to(device)(on_device).feats.cpu(), expected, atol=1e-12)
    assert torch.allclose(full.to(device)(on_device).feats.cpu(), expected, atol=1e-12)


def test_checkpointing_recomputes_and_gives_same_gradients():
    x = random_sparse(2, 6, 0.4, 8)
    block = SparseTransformerBlock(8, 2, window_size=4, shift=2).double()
    calls = []
    block.attn.register_forward_hook(lambda *a: calls.append(1))
    grads = []
    for use in (False, True):
        block.use_checkpoint = use
        block.zero_grad()
        feats = x.feats.clone().requires_grad_()
        block(x.replace(feats)).feats.square().sum().backward()
        grads.append((feats.grad, block.attn.to_qkv.weight.grad.clone()))
    assert len(calls) == 3  # once without checkpointing, twice (forward + recompute) with it
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-12)


def test_block_gradients_match_finite_differences():
    x = random_sparse(1, 4, 0.4, 4)
    block = SparseTransformerBlock(4, 2, window_size=2, shift=1, use_checkpoint=True).double()
    feats = x.feats.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: block(x.replace(f)).feats, (feats,))

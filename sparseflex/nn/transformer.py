"""Pre-norm sparse transformer blocks with optional activation checkpointing.

State-dict names mirror the TripoSF checkpoint: ``attn.to_qkv``, ``attn.to_out``, ``mlp.mlp.0``, ``mlp.mlp.2``
(the LayerNorms have no affine parameters, so ``norm1`` / ``norm2`` hold no keys).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import OptionError
from .attention import SparseFullSelfAttention, SparseWindowSelfAttention
from .basic import SparseLayerNorm
from .sparse_tensor import SparseTensor


class SparseFeedForward(nn.Module):
    """``Linear(C, ratio C) -> GELU-tanh -> Linear(ratio C, C)`` on every voxel."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(self.mlp(x.feats))


def _self_attention(channels, num_heads, attn_mode, window_size, shift, qkv_bias):
    if attn_mode == "window":
        return SparseWindowSelfAttention(channels, num_heads, window_size, shift, qkv_bias)
    if attn_mode == "full":
        return SparseFullSelfAttention(channels, num_heads, qkv_bias)
    raise OptionError(f"attn_mode must be 'window' or 'full'; got {attn_mode!r}")


class _Checkpointed(nn.Module):
    """Runs ``_forward`` under ``torch.utils.checkpoint`` (non-reentrant) when ``use_checkpoint`` and grads are on."""

    use_checkpoint = False

    def forward(self, *args):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class SparseTransformerBlock(_Checkpointed):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; window attention (optionally shifted) or full attention.

    The SPEC's encoder/decoder blocks: LayerNorm without affine (eps 1e-6), 8^3 windows, ``shift = 4`` in odd blocks,
    MLP x4 with GELU-tanh, qkv with bias.
    """

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float = 4.0, attn_mode: str = "window",
                 window_size: int = 8, shift: int = 0, qkv_bias: bool = True, ln_affine: bool = False,
                 use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = SparseLayerNorm(channels, elementwise_affine=ln_affine)
        self.attn = _self_attention(channels, num_heads, attn_mode, window_size, shift, qkv_bias)
        self.norm2 = SparseLayerNorm(channels, elementwise_affine=ln_affine)
        self.mlp = SparseFeedForward(channels, mlp_ratio)

    def _forward(self, x: SparseTensor) -> SparseTensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

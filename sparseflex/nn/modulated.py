"""DiT-style blocks for the flow models, on dense token sets ``[B, N, C]`` (SPEC section 4, image-to-3D).

One block serves both flows: the structure flow's tokens are the cells of a dense grid; the structured-latent flow's
are a variable number of voxels per item, padded to ``[B, N_max, C]`` (:func:`to_padded`) with a key mask that keeps
the padding out of every softmax.

Block (TRELLIS' ModulatedTransformerCrossBlock layout, DiT's adaLN-Zero)::

    x = x + gate_msa * SelfAttn(LN(x) * (1 + scale_msa) + shift_msa)     q, k RMS-normalised per head
    x = x + CrossAttn(LN_affine(x), image tokens)                         not modulated
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)           GELU(tanh), x4

shift/scale/gate come from the timestep embedding through a zero-initialised ``SiLU -> Linear`` (adaLN-Zero), and
the cross-attention output projection is zero-initialised too (as PixArt-alpha does), so a fresh block is exactly
the identity and a fresh model starts from a zero velocity.

Time embedding, modulation helpers and the sinusoidal position embedding are the ones of :mod:`.embedding`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, OptionError
from .embedding import adaln_modulation, gate, modulate
from .sparse_tensor import SparseTensor
from .transformer import _Checkpointed


#: Off CUDA, one attention call covers at most this many scores (batch x heads x queries x keys): longer query sets
#: are split into chunks. torch's fused CPU kernel (torch >= 2.3 with masks) never materialises the scores, but the
#: math path it falls back to on older versions does, a few [B, H, Nq, Nk] temporaries at once; 2^25 scores (128 MiB
#: in float32) per chunk keep inference bounded either way. (Under autograd that fallback still keeps every chunk's
#: softmax for the backward pass; CPU training at tens of thousands of tokens is not a goal.)
CPU_ATTENTION_ELEMENTS = 1 << 25


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` of ``q [B, H, Nq, D]`` on ``k, v [B, H, Nk, D]`` with an optional boolean
    ``mask`` broadcastable to ``[B, H, Nq, Nk]`` (True = attend). On CUDA one call (its efficient kernels bound the
    memory); elsewhere queries go in chunks of at most :data:`CPU_ATTENTION_ELEMENTS` scores (rows are independent,
    so the result is the same)."""
    b, h, nq, _ = q.shape
    step = nq if q.is_cuda else max(1, CPU_ATTENTION_ELEMENTS // max(1, b * h * k.shape[2]))
    if step >= nq:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    per_query = mask is not None and mask.dim() >= 2 and mask.shape[-2] > 1
    return torch.cat([F.scaled_dot_product_attention(q[:, :, s:s + step], k, v,
                                                     attn_mask=mask[..., s:s + step, :] if per_query else mask)
                      for s in range(0, nq, step)], dim=2)


class MultiHeadRMSNorm(nn.Module):
    """RMS normalisation of each head's query or key vector with a learned per-head gain ``gamma [H, D]`` (qk-norm:
    bounds the attention logits, which keeps long training in half precision stable). Computed in float32."""

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., H, D]`` -> ``x / rms(x) * gamma`` (rms over D)."""
        y = F.normalize(x.float(), dim=-1) * math.sqrt(x.shape[-1])
        return (y * self.gamma.float()).to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention on ``[B, N, C]`` tokens through :func:`chunked_attention`.

    Self-attention when ``context_channels`` is None (fused ``to_qkv``), else cross-attention to a context
    ``[B, T, context_channels]`` (``to_q``, ``to_kv``); optional per-head q/k RMS norm. ``key_mask [B, N_keys]``
    (bool, True = real token) keeps padded keys out of the softmax; padded queries give values that callers drop.
    """

    def __init__(self, channels: int, num_heads: int, context_channels: int | None = None, qkv_bias: bool = True,
                 qk_rms_norm: bool = False):
        super().__init__()
        if channels % num_heads:
            raise OptionError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels, self.num_heads = channels, num_heads
        self.head_dim = channels // num_heads
        self.is_cross = context_channels is not None
        if self.is_cross:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(context_channels, 2 * channels, bias=qkv_bias)
        else:
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.qk_rms_norm = qk_rms_norm
        self.to_out = nn.Linear(channels, channels)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, cross={self.is_cross}, qk_rms_norm={self.qk_rms_norm}"

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        if self.is_cross:
            if context is None or context.dim() != 3 or len(context) != b:
                got = None if context is None else tuple(context.shape)
                raise InputError(f"cross-attention needs a context [{b}, T, C]; got {got}")
            q = self.to_q(x).view(b, n, h, d)
            k, v = self.to_kv(context).view(b, context.shape[1], 2, h, d).unbind(2)
        else:
            q, k, v = self.to_qkv(x).view(b, n, 3, h, d).unbind(2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        mask = None
        if key_mask is not None:
            if key_mask.shape != k.shape[:2]:
                raise InputError(f"key mask must be {tuple(k.shape[:2])}; got {tuple(key_mask.shape)}")
            mask = key_mask.bool()[:, None, None, :]  # [B, 1, 1, N_keys], broadcast over heads and queries
        out = chunked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.channels))


class FeedForward(nn.Module):
    """``Linear(C, ratio C) -> GELU(tanh) -> Linear(ratio C, C)`` on every token."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _xavier_linears(module: nn.Module):
    # DiT's init for every linear layer; the zero-initialised ones are re-zeroed by their owners afterwards
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ModulatedTransformerCrossBlock(_Checkpointed):
    """adaLN-Zero transformer block: modulated self-attention (q/k RMS norm), cross-attention to condition tokens
    (affine LayerNorm on the query side, no modulation), modulated MLP; see the module docstring.

    ``forward(x [B, N, C], emb [B, C], context [B, T, Cc], mask [B, N] | None, context_mask [B, T] | None)``.
    LayerNorms have eps 1e-6; a fresh block is the identity (:meth:`reset_parameters`).
    """

    def __init__(self, channels: int, context_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_rms_norm: bool = True, qk_rms_norm_cross: bool = False, qkv_bias: bool = True,
                 use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=False)
        self.self_attn = MultiHeadAttention(channels, num_heads, qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm)
        self.norm2 = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=True)
        self.cross_attn = MultiHeadAttention(channels, num_heads, context_channels, qkv_bias, qk_rms_norm_cross)
        self.norm3 = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=False)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.adaLN_modulation = adaln_modulation(channels, channels, 6)
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier-uniform linears with zero biases (DiT), then adaLN-Zero: the modulation and the cross-attention
        output projection start at zero, so both gates are shut and the ungated cross-attention adds nothing."""
        _xavier_linears(self)
        for layer in (self.adaLN_modulation[-1], self.cross_attn.to_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None,
                 context_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(emb).chunk(6, dim=1)
        x = x + gate(self.self_attn(modulate(self.norm1(x), shift_msa, scale_msa), key_mask=mask), gate_msa)
        x = x + self.cross_attn(self.norm2(x), context, key_mask=context_mask)
        return x + gate(self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp)), gate_mlp)


class FinalLayer(nn.Module):
    """Output head: LayerNorm (no affine, eps 1e-6), optionally adaLN shift/scale from the time embedding (DiT's
    final layer; TRELLIS' structure flow has none), then a zero-initialised linear, so a fresh model outputs 0."""

    def __init__(self, channels: int, out_channels: int, modulated: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = adaln_modulation(channels, channels, 2) if modulated else None
        self.linear = nn.Linear(channels, out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(emb).chunk(2, dim=1)
            h = modulate(h, shift, scale)
        return self.linear(h)


def to_padded(x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A SparseTensor's rows as padded tokens ``[B, N_max, C]`` (zeros after each item's rows) and the token mask
    ``[B, N_max]`` (True = real row), for :class:`ModulatedTransformerCrossBlock` on variable-length items."""
    counts = torch.bincount(x.batch_index, minlength=x.batch_size)
    n_max = int(counts.max()) if len(counts) and len(x) else 0
    pos = torch.arange(len(x), device=x.device) - x.offsets[:-1].index_select(0, x.batch_index)
    tokens = x.feats.new_zeros(x.batch_size, n_max, *x.feats.shape[1:])
    tokens[x.batch_index, pos] = x.feats
    mask = torch.arange(n_max, device=x.device)[None] < counts[:, None]
    return tokens, mask


def from_padded(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_padded`: the real rows ``[N, C]``, in the SparseTensor's (batch-sorted) order."""
    return tokens[mask]

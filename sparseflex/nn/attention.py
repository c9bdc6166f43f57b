"""Attention on sparse voxels, all through ``torch.nn.functional.scaled_dot_product_attention``.

Variable-length groups of tokens (8^3 windows, or whole samples) are gathered into a few dense batches: groups are
bucketed by length, each bucket padded to its longest member with a key mask, so the work is one dense SDPA per
bucket on little more than the real tokens. The partition is cached on the coordinate set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, OptionError
from ..sparse.coords import coords_to_keys
from .sparse_tensor import SparseTensor

#: A group of length L is padded to a multiple of max(1, 2^floor(log2 L) / BUCKET_GRANULARITY): at most 1/16
#: padding per bucket while keeping the number of SDPA calls to at most 16 per power of two of window length.
BUCKET_GRANULARITY = 16


class VarlenPlan:
    """Gather/scatter plan for attention inside variable-length token groups.

    ``index [T]`` lists the padded token rows bucket by bucket (padding repeats a real token of the same group and is
    masked as a key); ``buckets`` holds ``(groups, length, key_mask or None)``; ``inverse [N]`` gives each token's
    position in the padded layout.
    """

    def __init__(self, group_keys: torch.Tensor, granularity: int = BUCKET_GRANULARITY):
        n = len(group_keys)
        device = group_keys.device
        sorted_keys, order = torch.sort(group_keys, stable=True)
        counts = torch.unique_consecutive(sorted_keys, return_counts=True)[1]
        starts = counts.cumsum(0) - counts
        lengths = counts
        if granularity > 0:
            step = (2 ** torch.floor(torch.log2(counts.double()))).long() // granularity
            step = step.clamp(min=1)
            lengths = (counts + step - 1) // step * step
        by_length = torch.sort(lengths, stable=True).indices
        bucket_len, bucket_groups = torch.unique_consecutive(lengths[by_length], return_counts=True)
        # padded slot t belongs to group g(t) at position p(t) inside it
        plen = lengths[by_length]
        g = torch.repeat_interleave(by_length, plen)
        p = torch.arange(len(g), device=device) - torch.repeat_interleave(plen.cumsum(0) - plen, plen)
        valid = p < counts[g]
        p = torch.where(valid, p, torch.zeros_like(p))
        self.index = order[starts[g] + p]
        self.inverse = torch.empty(n, dtype=torch.long, device=device)
        self.inverse[self.index[valid]] = valid.nonzero().squeeze(1)
        self.buckets = []
        offset = 0
        for groups, length in zip(bucket_groups.tolist(), bucket_len.tolist()):
            size = groups * length
            mask = valid[offset:offset + size].view(groups, 1, 1, length)
            self.buckets.append((groups, length, None if bool(mask.all()) else mask))
            offset += size

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA of ``q, k, v [N, H, D]`` within each group; returns ``[N, H, D]`` in the input row order."""
        return self.attend_packed(torch.stack([q, k, v], dim=1))

    def attend_packed(self, qkv: torch.Tensor) -> torch.Tensor:
        """Like :meth:`attend` for a fused ``qkv [N, 3, H, D]`` (one gather instead of three)."""
        n, _, heads, dim = qkv.shape
        if not self.buckets:
            return qkv.new_zeros(n, heads, dim)
        padded = qkv.index_select(0, self.index)
        sizes = [groups * length for groups, length, _ in self.buckets]
        outs = []
        for (groups, length, mask), chunk in zip(self.buckets, padded.split(sizes)):
            q, k, v = chunk.view(groups, length, 3, heads, dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [groups, H, length, D]
            outs.append(o.transpose(1, 2).reshape(groups * length, heads, dim))
        return torch.cat(outs).index_select(0, self.inverse)


def window_ids(coords: torch.Tensor, window_size: int, shift: int) -> torch.Tensor:
    """One int64 key per voxel naming its window: ``(batch, floor((xyz + shift) / window_size))``."""
    w = coords.clone()
    w[:, 1:] = torch.div(w[:, 1:] + shift, window_size, rounding_mode="floor")
    return coords_to_keys(w)


def window_plan(x: SparseTensor, window_size: int, shift: int) -> VarlenPlan:
    """Cached plan for attention inside ``window_size^3`` windows offset by ``shift`` (not cyclic)."""
    return x.cached(("window", window_size, shift), lambda: VarlenPlan(window_ids(x.coords, window_size, shift)))


def sample_plan(x: SparseTensor) -> VarlenPlan:
    """Cached plan for attention over each whole sample (exact lengths, no padding)."""
    return x.cached("sample_plan", lambda: VarlenPlan(x.batch_index, granularity=0))


class _SelfAttention(nn.Module):
    def __init__(self, channels: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if channels % num_heads:
            raise OptionError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels, self.num_heads = channels, num_heads
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.to_out = nn.Linear(channels, channels)

    def _plan(self, x: SparseTensor) -> VarlenPlan:
        raise NotImplementedError

    def forward(self, x: SparseTensor) -> SparseTensor:
        n = len(x)
        # the fused projection is laid out [3, heads, head_dim] along channels (the TripoSF checkpoint layout)
        qkv = self.to_qkv(x.feats).view(n, 3, self.num_heads, self.channels // self.num_heads)
        out = self._plan(x).attend_packed(qkv)
        return x.replace(self.to_out(out.reshape(n, self.channels)))


class SparseWindowSelfAttention(_SelfAttention):
    """Multi-head self-attention inside ``window_size^3`` voxel windows of each sample, windows offset by ``shift``."""

    def __init__(self, channels: int, num_heads: int, window_size: int = 8, shift: int = 0, qkv_bias: bool = True):
        super().__init__(channels, num_heads, qkv_bias)
        if window_size < 1:
            raise OptionError(f"window_size must be >= 1; got {window_size}")
        self.window_size, self.shift = window_size, shift

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window={self.window_size}, shift={self.shift}"

    def _plan(self, x):
        return window_plan(x, self.window_size, self.shift)


class SparseFullSelfAttention(_SelfAttention):
    """Multi-head self-attention over all voxels of each sample."""

    def _plan(self, x):
        return sample_plan(x)


class SparseCrossAttention(nn.Module):
    """Voxels (queries) attend to a dense per-sample context ``[B, L, context_channels]``."""

    def __init__(self, channels: int, context_channels: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if channels % num_heads:
            raise OptionError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels, self.num_heads = channels, num_heads
        self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
        self.to_kv = nn.Linear(context_channels, 2 * channels, bias=qkv_bias)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: SparseTensor, context: torch.Tensor) -> SparseTensor:
        if context.dim() != 3 or len(context) != x.batch_size:
            raise InputError(f"context must be [{x.batch_size}, L, C]; got {tuple(context.shape)}")
        h = self.num_heads
        q = self.to_q(x.feats).view(len(x), h, self.channels // h)
        kv = self.to_kv(context).view(*context.shape[:2], 2, h, -1)
        outs = []
        for b, rows in enumerate(x.layout):
            qb = q[rows].transpose(0, 1)[None]  # [1, H, n_b, D]
            kb, vb = kv[b, :, 0].transpose(0, 1)[None], kv[b, :, 1].transpose(0, 1)[None]
            outs.append(F.scaled_dot_product_attention(qb, kb, vb)[0].transpose(0, 1))
        out = torch.cat(outs) if outs else q
        return x.replace(self.to_out(out.reshape(len(x), self.channels)))

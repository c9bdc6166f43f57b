"""Attention on sparse voxels: inside variable-length token groups (8^3 windows, or whole samples), and from voxels to
a dense per-sample context.

A group plan (:class:`VarlenPlan`, cached on the coordinate set) runs the groups in one of three ways, equal within
float rounding:

- ``buckets`` (the CPU default): groups bucketed by length, each bucket padded to its longest member with a key mask,
  one ``scaled_dot_product_attention`` per bucket. Lengths round up to 1/16 of their power of two, so the padding
  stays under 1/16, which is what a CPU pays for; but that is up to 16 calls per octave of window length.
- ``pow2``: lengths round up to a power of two, so a level of 8^3 windows takes at most 10 calls for up to twice
  the tokens. A GPU at these sizes is bound by kernel launches (hundreds of calls per step), not by that padding.
- ``varlen``: one flash-attention call on the unpadded groups (``torch.nn.attention.varlen.varlen_attn``; CUDA, half
  precision). ``auto`` (the default) uses it when the installed torch, the GPU and the tensors allow it and ``pow2``
  on CUDA otherwise; should the kernel fail, it warns once and falls back to ``pow2``.

``SPARSEFLEX_ATTENTION`` in the environment or :func:`set_attention_backend` forces one of them; the same setting
chooses between one padded call and a call per sample in :class:`SparseCrossAttention`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, OptionError
from ..sparse.coords import coords_to_keys
from .sparse_tensor import SparseTensor

#: A group of length L is padded to a multiple of max(1, 2^floor(log2 L) / BUCKET_GRANULARITY): at most 1/16
#: padding per bucket while keeping the number of SDPA calls to at most 16 per power of two of window length.
BUCKET_GRANULARITY = 16
#: Granularity 1 pads each group to the next power of two (the ``pow2`` layout).
POW2_GRANULARITY = 1

BACKENDS = ("auto", "buckets", "pow2", "varlen")
_backend = os.environ.get("SPARSEFLEX_ATTENTION", "auto")
_varlen_failed = False


def set_attention_backend(name: str) -> str:
    """Force how variable-length groups are attended (one of :data:`BACKENDS`); returns the previous setting."""
    global _backend
    if name not in BACKENDS:
        raise OptionError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    previous, _backend = _backend, name
    return previous


@contextlib.contextmanager
def attention_backend(name: str):
    """Context manager form of :func:`set_attention_backend`."""
    previous = set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


@functools.lru_cache(maxsize=None)
def _varlen_function():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_supported(qkv: torch.Tensor) -> bool:
    """Whether torch's flash varlen kernel can take these tensors: CUDA, float16/bfloat16, head size a multiple of 8
    up to 256, compute capability 8.0 or newer, flash attention not disabled, and ``varlen_attn`` present."""
    if _varlen_failed or not qkv.is_cuda or qkv.dtype not in (torch.float16, torch.bfloat16):
        return False
    dim = qkv.shape[-1]
    if dim % 8 or dim > 256 or not torch.backends.cuda.flash_sdp_enabled():
        return False
    if torch.cuda.get_device_capability(qkv.device)[0] < 8:
        return False
    return _varlen_function() is not None


def _varlen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   max_q: int, max_k: int) -> torch.Tensor:
    """Attention of ``q [Tq, H, D]`` on ``k, v [Tk, H, D]``, group i being rows ``cu_q[i]:cu_q[i + 1]`` of ``q`` and
    ``cu_k[i]:cu_k[i + 1]`` of ``k, v`` (int32 offsets). The tests stand in for it on the CPU."""
    varlen_attn = _varlen_function()
    if varlen_attn is None:
        raise OptionError(f"varlen attention needs torch.nn.attention.varlen (torch {torch.__version__} lacks it)")
    # positional arguments only: the keywords after max_k differ between torch releases
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)


def _run_varlen(fn):
    """``fn()``; when the varlen kernel was chosen automatically and fails, None (with one warning, and the padded
    layouts from then on)."""
    global _varlen_failed
    if _backend == "varlen":  # forced: let a failure surface
        return fn()
    try:
        return fn()
    except (RuntimeError, NotImplementedError) as exc:
        _varlen_failed = True
        warnings.warn(f"varlen attention failed ({str(exc).splitlines()[0]}); using padded buckets instead",
                      RuntimeWarning, stacklevel=3)
        return None


@functools.lru_cache(maxsize=None)
def _varlen_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per device and dtype: the varlen kernel's forward and backward on two small groups agree with SDPA
    (a torch build whose kernel lacks a backward would otherwise fail in the middle of a training step)."""
    global _varlen_failed
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            gen = torch.Generator(device).manual_seed(0)
            qkv = torch.randn(24, 3, 2, 16, device=device, generator=gen).to(dtype).requires_grad_()
            cu = torch.tensor([0, 9, 24], dtype=torch.int32, device=device)
            q, k, v = (t.contiguous() for t in qkv.unbind(1))
            out = _varlen_kernel(q, k, v, cu, cu, 15, 15)
            ref = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)))
                             .transpose(0, 1) for a, b in ((0, 9), (9, 24))])
            grad, = torch.autograd.grad(out.float().sum(), qkv)
            grad_ref, = torch.autograd.grad(ref.float().sum(), qkv)
        ok = bool(torch.allclose(out.float(), ref.float(), atol=2e-2) and torch.allclose(grad, grad_ref, atol=5e-2))
        reason = "it disagrees with scaled_dot_product_attention"
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        ok, reason = False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not ok:
        _varlen_failed = True
        warnings.warn(f"varlen attention unusable on {device} ({reason}); using padded buckets instead",
                      RuntimeWarning, stacklevel=2)
    return ok


def _resolve(qkv: torch.Tensor) -> str:
    """The backend for this call: the forced one, else ``varlen`` (when it passes a one-time check) or ``pow2`` on
    CUDA, and ``buckets`` elsewhere."""
    if _backend != "auto":
        if _backend not in BACKENDS:
            raise OptionError(f"SPARSEFLEX_ATTENTION={_backend!r} is not one of {', '.join(BACKENDS)}")
        return _backend
    if not qkv.is_cuda:
        return "buckets"
    return "varlen" if varlen_supported(qkv) and _varlen_works(qkv.device, qkv.dtype) else "pow2"


class _Padded:
    """One padded layout of a plan: ``index [T]`` lists the padded token rows bucket by bucket (padding repeats a
    real token of the same group and is masked as a key), ``buckets`` holds ``(groups, length, key_mask or None)``,
    ``inverse [N]`` gives each token's position in the padded layout."""

    def __init__(self, order: torch.Tensor, counts: torch.Tensor, granularity: int):
        n, device = len(order), order.device
        starts = counts.cumsum(0) - counts
        lengths = counts
        if granularity > 0:
            step = (2 ** torch.floor(torch.log2(counts.double()))).long() // granularity
            step = step.clamp(min=1)
            lengths = (counts + step - 1) // step * step
        by_length = torch.sort(lengths, stable=True).indices
        plen = lengths[by_length]
        bucket_len, bucket_groups = torch.unique_consecutive(plen, return_counts=True)
        # padded slot t belongs to group g(t) at position p(t) inside it
        g = torch.repeat_interleave(by_length, plen)
        p = torch.arange(len(g), device=device) - torch.repeat_interleave(plen.cumsum(0) - plen, plen)
        valid = p < counts[g]
        p = torch.where(valid, p, torch.zeros_like(p))
        self.index = order[starts[g] + p]
        self.inverse = torch.empty(n, dtype=torch.long, device=device)
        self.inverse[self.index[valid]] = valid.nonzero().squeeze(1)
        # which buckets hold a padded group, for all buckets at once (one host transfer, not one per bucket)
        bucket_of_group = torch.repeat_interleave(torch.arange(len(bucket_len), device=device), bucket_groups)
        padded = torch.zeros(len(bucket_len), dtype=torch.long, device=device).index_add_(
            0, bucket_of_group, (counts[by_length] < plen).long())
        self.buckets = []
        offset = 0
        for groups, length, masked in zip(*torch.stack([bucket_groups, bucket_len, padded]).tolist()):
            size = groups * length
            mask = valid[offset:offset + size].view(groups, 1, 1, length) if masked else None
            self.buckets.append((groups, length, mask))
            offset += size

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        n, _, heads, dim = qkv.shape
        padded = qkv.index_select(0, self.index)
        sizes = [groups * length for groups, length, _ in self.buckets]
        outs = []
        for (groups, length, mask), chunk in zip(self.buckets, padded.split(sizes)):
            q, k, v = chunk.view(groups, length, 3, heads, dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [groups, H, length, D]
            outs.append(o.transpose(1, 2).reshape(groups * length, heads, dim))
        return torch.cat(outs).index_select(0, self.inverse)


class VarlenPlan:
    """Gather/scatter plan for attention inside variable-length token groups (tokens with equal ``group_keys``).

    ``granularity`` sets the ``buckets`` layout (0: exact lengths); ``index``, ``inverse`` and ``buckets`` describe
    that layout (see :class:`_Padded`). The other layouts are built on first use and kept.
    """

    def __init__(self, group_keys: torch.Tensor, granularity: int = BUCKET_GRANULARITY):
        self.granularity = granularity
        sorted_keys, self.order = torch.sort(group_keys, stable=True)
        self.counts = torch.unique_consecutive(sorted_keys, return_counts=True)[1]
        self._layouts: dict[int, _Padded] = {}
        self._varlen = None

    def layout(self, granularity: int) -> _Padded:
        if granularity not in self._layouts:
            self._layouts[granularity] = _Padded(self.order, self.counts, granularity)
        return self._layouts[granularity]

    @property
    def index(self) -> torch.Tensor:
        return self.layout(self.granularity).index

    @property
    def inverse(self) -> torch.Tensor:
        return self.layout(self.granularity).inverse

    @property
    def buckets(self) -> list:
        return self.layout(self.granularity).buckets

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA of ``q, k, v [N, H, D]`` within each group; returns ``[N, H, D]`` in the input row order."""
        return self.attend_packed(torch.stack([q, k, v], dim=1))

    def attend_packed(self, qkv: torch.Tensor) -> torch.Tensor:
        """Like :meth:`attend` for a fused ``qkv [N, 3, H, D]`` (one gather instead of three)."""
        n, _, heads, dim = qkv.shape
        if len(self.counts) == 0:
            return qkv.new_zeros(n, heads, dim)
        backend = _resolve(qkv)
        if backend == "varlen":
            out = _run_varlen(lambda: self._attend_varlen(qkv))
            if out is not None:
                return out
            backend = "pow2"
        granularity = POW2_GRANULARITY if backend == "pow2" else self.granularity
        return self.layout(granularity).attend(qkv)

    def _attend_varlen(self, qkv: torch.Tensor) -> torch.Tensor:
        if self._varlen is None:
            cu = torch.cat([self.counts.new_zeros(1), self.counts.cumsum(0)]).to(torch.int32)
            inverse = torch.empty_like(self.order)
            inverse[self.order] = torch.arange(len(self.order), device=self.order.device)
            self._varlen = (cu, int(self.counts.max()), inverse)
        cu, max_len, inverse = self._varlen
        q, k, v = (t.contiguous() for t in qkv.index_select(0, self.order).unbind(1))
        return _varlen_kernel(q, k, v, cu, cu, max_len, max_len).index_select(0, inverse)


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


def _query_slots(x: SparseTensor) -> tuple[torch.Tensor, int]:
    """Each row's slot in a ``[B, longest sample]`` padding of the rows, and that length (cached)."""
    def build():
        counts = x.offsets[1:] - x.offsets[:-1]
        longest = int(counts.max()) if len(counts) else 0
        position = torch.arange(len(x), device=x.device) - x.offsets[:-1].index_select(0, x.batch_index)
        return x.batch_index * longest + position, longest
    return x.cached("query_slots", build)


class SparseCrossAttention(nn.Module):
    """Voxels (queries) attend to a dense per-sample context ``[B, L, context_channels]``.

    On CUDA all samples go in one call: a varlen call (see the module docstring), or the queries padded to the
    longest sample; elsewhere one call per sample, which pads nothing. The backend setting forces one of them.
    """

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
        backend = _resolve(q) if len(x) else "buckets"
        out = _run_varlen(lambda: self._varlen(x, q, kv)) if backend == "varlen" else None
        if out is None and backend != "buckets":
            out = self._padded(x, q, kv)
        if out is None:
            outs = []
            for b, rows in enumerate(x.layout):
                qb = q[rows].transpose(0, 1)[None]  # [1, H, n_b, D]
                kb, vb = kv[b, :, 0].transpose(0, 1)[None], kv[b, :, 1].transpose(0, 1)[None]
                outs.append(F.scaled_dot_product_attention(qb, kb, vb)[0].transpose(0, 1))
            out = torch.cat(outs) if outs else q
        return x.replace(self.to_out(out.reshape(len(x), self.channels)))

    @staticmethod
    def _padded(x: SparseTensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """All samples in one SDPA: queries padded with zeros (every key is real, so no mask; the padded rows'
        outputs are dropped)."""
        slots, longest = _query_slots(x)
        batch, heads, dim = x.batch_size, q.shape[1], q.shape[2]
        padded = q.new_zeros(batch * longest, heads, dim).index_copy(0, slots, q)
        qp = padded.view(batch, longest, heads, dim).transpose(1, 2)          # [B, H, n_max, D]
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)       # [B, H, L, D]
        out = F.scaled_dot_product_attention(qp, k, v).transpose(1, 2).reshape(batch * longest, heads, dim)
        return out.index_select(0, slots)

    @staticmethod
    def _varlen(x: SparseTensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """All samples in one varlen call: the rows are already grouped by sample, the context has L rows each."""
        _, longest = _query_slots(x)
        batch, length = kv.shape[:2]
        cu_q = x.offsets.to(torch.int32)
        cu_k = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=q.device)
        k, v = (kv[:, :, i].reshape(batch * length, *kv.shape[3:]).contiguous() for i in (0, 1))
        return _varlen_kernel(q.contiguous(), k, v, cu_q, cu_k, longest, length)

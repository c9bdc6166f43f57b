"""Submanifold sparse 3D convolution (output voxels = input voxels) by gather - matmul per kernel offset.

The kernel is stored as ``weight [out, kx, ky, kz, in]``: kernel index ``(i, j, k)`` reads the neighbour at offset
``(i, j, k) - size // 2`` (the TripoSF checkpoint layout), so a dense ``nn.Conv3d`` with
``weight.permute(0, 4, 1, 2, 3)`` computes the same thing on a full grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError, OptionError
from ..sparse.coords import kernel_offsets, neighbour_map
from .sparse_tensor import SparseTensor

#: Rows gathered at once are capped so one chunk holds at most this many feature values (bounds peak memory and
#: keeps a chunk in cache).
CHUNK_ELEMENTS = 1 << 22
#: Offsets whose neighbour is present for at least this fraction of voxels are computed densely (gather every row,
#: a zero row standing in for absent neighbours, accumulate with addmm: no scatter at all); sparser offsets gather
#: only the existing pairs and scatter with index_add. On CPU the dense form wins only when nearly full (solid
#: regions: ~25% faster at fill > 0.9); on a surface band (fill 0.35-0.7 per offset) the pairs are faster.
DENSE_FILL = 0.9


class ConvPlan:
    """Neighbour structure of a coordinate set for one kernel size (built once, cached on the SparseTensor).

    ``neighbours [K, N]`` row of the voxel at offset k, ``N`` (a zero row) where absent (int32 to halve the memory
    at millions of voxels); ``dense`` lists the
    well-filled offsets, ``pairs[k] = (out_rows, in_rows)`` holds the others. Offsets ``k`` and ``K - 1 - k`` are
    opposite, so the transpose of offset ``k`` is offset ``K - 1 - k`` and the backward pass is gathers too.
    """

    def __init__(self, x: SparseTensor, kernel_size: int, dense_fill: float | None = None):
        dense_fill = DENSE_FILL if dense_fill is None else dense_fill
        n = len(x)
        offsets = kernel_offsets(kernel_size, x.coords.device)
        k = len(offsets)
        half = k // 2
        # the first half of the lookups gives the second half for free
        nbr = neighbour_map(x.coords, offsets[:half], x.hash)
        index_type = torch.int32 if n < 2 ** 31 - 1 else torch.long
        full = torch.full((k, n), n, dtype=index_type, device=x.coords.device)
        full[half] = torch.arange(n, dtype=index_type, device=x.coords.device)
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dense: list[int] = []
        for m in range(half):
            out_rows = (nbr[:, m] >= 0).nonzero().squeeze(1)
            in_rows = nbr[out_rows, m]
            full[m, out_rows] = in_rows.to(index_type)
            full[k - 1 - m, in_rows] = out_rows.to(index_type)
            if len(out_rows) >= dense_fill * n:
                self.dense += [m, k - 1 - m]
            else:
                self.pairs[m] = (out_rows, in_rows)
                self.pairs[k - 1 - m] = (in_rows, out_rows)
        self.neighbours = full
        self.centre = half
        self.size = k


def conv_plan(x: SparseTensor, kernel_size: int) -> ConvPlan:
    """The cached :class:`ConvPlan` of ``x``'s coordinates."""
    return x.cached(("conv_plan", kernel_size), lambda: ConvPlan(x, kernel_size))


def _chunks(n: int, channels: int):
    step = max(1024, CHUNK_ELEMENTS // max(channels, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _gather_conv(out, src, weights, plan, columns, transpose):
    """``out[n] += sum_k weights(k) src[neighbours[n, col(k)]]`` over the dense offsets, in row chunks."""
    padded = torch.cat([src, src.new_zeros(1, src.shape[1])])
    for s in _chunks(len(out), max(src.shape[1], out.shape[1])):
        o = out[s]
        for k in columns:
            col = plan.size - 1 - k if transpose else k
            o.addmm_(padded.index_select(0, plan.neighbours[col, s]), weights(k))


class _SubmanifoldConv(torch.autograd.Function):
    """``out[o] = bias + sum_k x[nbr(o, k)] W_k`` for ``weight [K, in, out]`` (contiguous per-offset matrices), with
    a hand-written backward that recomputes gathers chunk by chunk instead of keeping gathered copies alive."""

    @staticmethod
    def forward(ctx, feats, weight, bias, plan):
        out = feats @ weight[plan.centre]
        if bias is not None:
            out = out + bias
        _gather_conv(out, feats, lambda k: weight[k], plan, plan.dense, transpose=False)
        width = max(weight.shape[1], weight.shape[2])
        for k, (out_rows, in_rows) in plan.pairs.items():
            for s in _chunks(len(out_rows), width):
                out.index_add_(0, out_rows[s], feats.index_select(0, in_rows[s]) @ weight[k])
        ctx.save_for_backward(feats, weight)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight = ctx.saved_tensors
        plan = ctx.plan
        grad_out = grad_out.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_w = None
        if need_x:
            # the transpose of offset k is offset K-1-k: gathers again, no scatter for the dense offsets
            grad_x = grad_out @ weight[plan.centre].t()
            _gather_conv(grad_x, grad_out, lambda k: weight[k].t(), plan, plan.dense, transpose=True)
        if need_w:
            grad_w = torch.zeros_like(weight)
            grad_w[plan.centre] = feats.t() @ grad_out
            padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
            for s in _chunks(len(feats), max(feats.shape[1], grad_out.shape[1])):
                for k in plan.dense:
                    grad_w[k].addmm_(padded.index_select(0, plan.neighbours[k, s]).t(), grad_out[s])
        width = max(weight.shape[1], weight.shape[2])
        for k, (out_rows, in_rows) in plan.pairs.items():
            for s in _chunks(len(out_rows), width):
                g = grad_out.index_select(0, out_rows[s])
                if need_x:
                    grad_x.index_add_(0, in_rows[s], g @ weight[k].t())
                if need_w:
                    grad_w[k].addmm_(feats.index_select(0, in_rows[s]).t(), g)
        grad_b = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class ConvKernel(nn.Module):
    """Holds a convolution's ``weight [out, k, k, k, in]`` and ``bias [out]`` (state-dict keys ``conv.weight``,
    ``conv.bias`` under a :class:`SparseConv3d`, as in the TripoSF checkpoint)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool):
        super().__init__()
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, k, k, k, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # torch.nn.Conv3d's default initialisation, with the same fan-in
        fan_in = in_channels * k ** 3
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)


class SparseConv3d(nn.Module):
    """Submanifold convolution with an odd cubic kernel (3 by default; 1 is a per-voxel linear map)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise OptionError(f"sparse convolution kernel_size must be odd and >= 1; got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.conv = ConvKernel(in_channels, out_channels, kernel_size, bias)

    @property
    def weight(self) -> nn.Parameter:
        return self.conv.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.conv.bias

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"

    def forward(self, x: SparseTensor) -> SparseTensor:
        feats = x.feats
        if feats.shape[1] != self.in_channels:
            raise InputError(f"SparseConv3d expects {self.in_channels} input channels; got {feats.shape[1]}")
        w = self.weight.to(feats.dtype).reshape(self.out_channels, -1, self.in_channels)
        b = None if self.bias is None else self.bias.to(feats.dtype)
        if self.kernel_size == 1:
            return x.replace(nn.functional.linear(feats, w[:, 0], b))
        per_offset = w.permute(1, 2, 0).contiguous()  # [K, in, out]: one contiguous matrix per kernel offset
        return x.replace(_SubmanifoldConv.apply(feats, per_offset, b, conv_plan(x, self.kernel_size)))

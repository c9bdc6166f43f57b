"""Feature-wise layers and normalisations on :class:`SparseTensor` (plain ``[N, C]`` tensors pass through too).

Each layer subclasses its torch counterpart, so parameter names and initialisation are torch's and checkpoints
written for dense layers load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .sparse_tensor import SparseTensor


class _FeatureWise:
    """Apply the torch layer to the feature rows of a SparseTensor (or to a plain tensor)."""

    def forward(self, x):
        if isinstance(x, SparseTensor):
            return x.replace(super().forward(x.feats))
        return super().forward(x)


class SparseLinear(_FeatureWise, nn.Linear):
    """``nn.Linear`` on every voxel."""


class SparseGELU(_FeatureWise, nn.GELU):
    """``nn.GELU`` on every voxel (pass ``approximate="tanh"`` for the SPEC's GELU-tanh)."""


class SparseSiLU(_FeatureWise, nn.SiLU):
    """``nn.SiLU`` on every voxel."""


class SparseReLU(_FeatureWise, nn.ReLU):
    """``nn.ReLU`` on every voxel."""


class SparseLayerNorm(_FeatureWise, nn.LayerNorm):
    """LayerNorm over the channels of each voxel; eps defaults to 1e-6 (SPEC section 4)."""

    def __init__(self, channels: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__(channels, eps=eps, elementwise_affine=elementwise_affine)


class SparseGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are taken per sample over all of that sample's voxels.

    Equals ``nn.GroupNorm`` applied to each sample's features laid out as ``[1, C, N_b]``. Half-precision input is
    normalised in float32.
    """

    def forward(self, x: SparseTensor) -> SparseTensor:
        if not isinstance(x, SparseTensor):
            raise InputError("SparseGroupNorm needs a SparseTensor (statistics are per sample)")
        c = x.feats.shape[1]
        if c != self.num_channels:
            raise InputError(f"SparseGroupNorm expects {self.num_channels} channels; got {c}")
        feats = x.feats.float() if x.feats.dtype in (torch.float16, torch.bfloat16) else x.feats
        # rows are grouped by sample, so each sample is one torch group_norm on its [1, C, N_b] view
        y = torch.cat([F.group_norm(feats[rows].t()[None], self.num_groups, self.weight, self.bias, self.eps)[0].t()
                       for rows in x.layout if rows.stop > rows.start] or [feats])
        return x.replace(y.to(x.feats.dtype))

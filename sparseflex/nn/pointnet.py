"""Local PointNet: one feature per voxel from the surface points that fall in it (SPEC section 4).

Parameter names follow the TripoSF checkpoint (``local_pc_encoder.fc_pos``, ``blocks.i.fc_0/fc_1/shortcut``,
``fc_c``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError, OptionError
from .resample import segment_reduce


def local_point_features(points: torch.Tensor, normals: torch.Tensor, voxel_xyz: torch.Tensor,
                         resolution: int) -> torch.Tensor:
    """``[P, 6]`` PointNet input: offset of each point (in the cube ``[-0.5, 0.5]^3``) from the centre of its voxel
    ``voxel_xyz [P, 3]`` in half-voxel units (so ``[-1, 1]`` inside the voxel), then its normal."""
    centres = (voxel_xyz.to(points.dtype) + 0.5) / resolution - 0.5
    return torch.cat([(points - centres) * (2 * resolution), normals.to(points.dtype)], dim=1)


class ResnetBlockFC(nn.Module):
    """Pre-activation residual MLP block: ``shortcut(x) + fc_1(act(fc_0(act(x))))``, bias-free linear shortcut."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.fc_0 = nn.Linear(in_channels, channels)
        self.fc_1 = nn.Linear(channels, channels)
        self.shortcut = nn.Linear(in_channels, channels, bias=False) if in_channels != channels else None
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dx = self.fc_1(self.act(self.fc_0(self.act(x))))
        return (x if self.shortcut is None else self.shortcut(x)) + dx


class LocalPointNet(nn.Module):
    """Points grouped by voxel -> ``[num_voxels, out_channels]``.

    ``fc_pos`` (in -> 2 hidden), then residual blocks (2 hidden -> hidden); before every block after the first, each
    point's feature is concatenated with the pool of its voxel. ``fc_c`` (hidden -> out) and a final per-voxel pool
    give the voxel feature. ``pool`` is ``"mean"`` (the release) or ``"max"`` (the paper).
    """

    def __init__(self, in_channels: int = 6, hidden: int = 256, out_channels: int = 1024, num_blocks: int = 5,
                 pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "max"):
            raise OptionError(f"pool must be 'mean' or 'max'; got {pool!r}")
        self.pool = pool
        self.fc_pos = nn.Linear(in_channels, 2 * hidden)
        self.blocks = nn.ModuleList([ResnetBlockFC(2 * hidden, hidden) for _ in range(num_blocks)])
        self.fc_c = nn.Linear(hidden, out_channels)

    def _pool(self, feats, voxel_index, num_voxels):
        return segment_reduce(feats, voxel_index, num_voxels, self.pool)

    def forward(self, point_feats: torch.Tensor, voxel_index: torch.Tensor, num_voxels: int) -> torch.Tensor:
        """``point_feats [P, in]`` (see :func:`local_point_features`), ``voxel_index [P]`` in ``[0, num_voxels)``."""
        if len(point_feats) != len(voxel_index):
            raise InputError(f"{len(point_feats)} points but {len(voxel_index)} voxel indices")
        net = self.fc_pos(point_feats)
        for i, block in enumerate(self.blocks):
            if i > 0:
                net = torch.cat([net, self._pool(net, voxel_index, num_voxels).index_select(0, voxel_index)], dim=1)
            net = block(net)
        return self._pool(self.fc_c(net), voxel_index, num_voxels)

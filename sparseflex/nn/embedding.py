"""Sinusoidal embeddings (voxel positions, diffusion time) and adaLN modulation helpers."""

from __future__ import annotations

import math

import torch
from torch import nn

from .sparse_tensor import SparseTensor


def sincos_position_embedding(xyz: torch.Tensor, channels: int) -> torch.Tensor:
    """Embed integer voxel coordinates ``xyz [N, 3]`` into ``[N, channels]`` (SPEC section 4).

    With ``F = channels // 6`` frequencies ``f_i = 1 / 10000^(i / F)``, each axis contributes
    ``[sin(a f_0..f_{F-1}), cos(a f_0..f_{F-1})]``, axes in x, y, z order; when 6 does not divide ``channels`` the
    remaining channels are zero. Width 768 gives 128 frequencies per axis, exactly filling 768.
    """
    freqs_per_axis = channels // 6
    freqs = 1.0 / 10000 ** (torch.arange(freqs_per_axis, dtype=torch.float32, device=xyz.device) / freqs_per_axis)
    angles = xyz.float()[:, :, None] * freqs  # [N, 3, F]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(len(xyz), 6 * freqs_per_axis)
    return nn.functional.pad(emb, (0, channels - emb.shape[1]))


class AbsolutePositionEmbedder(nn.Module):
    """Parameter-free 3D sinusoidal embedding of a SparseTensor's integer voxel coordinates."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: SparseTensor) -> torch.Tensor:
        """``[N, channels]`` float32 embedding of ``x.coords[:, 1:]``."""
        return sincos_position_embedding(x.coords[:, 1:], self.channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[B, dim]`` embedding ``[cos(t f), sin(t f)]`` of (possibly fractional) times ``t [B]`` with
    ``dim // 2`` frequencies ``f_i = max_period^(-i / (dim // 2))``; odd ``dim`` gets a zero last channel."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))


class TimestepEmbedder(nn.Module):
    """Sinusoidal time features followed by an MLP (Linear, SiLU, Linear) to ``channels``."""

    def __init__(self, channels: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def _broadcast(x, values: torch.Tensor) -> torch.Tensor:
    """Per-sample ``values [B, C]`` laid out like ``x``: per voxel for a SparseTensor, else ``[B, 1, C]``."""
    if isinstance(x, SparseTensor):
        return x.per_sample(values)
    return values[:, None]


def modulate(x, shift: torch.Tensor, scale: torch.Tensor):
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``shift, scale [B, C]`` (SparseTensor or ``[B, L, C]``)."""
    if isinstance(x, SparseTensor):
        return x.replace(x.feats * (1 + _broadcast(x, scale)) + _broadcast(x, shift))
    return x * (1 + _broadcast(x, scale)) + _broadcast(x, shift)


def gate(x, gate_values: torch.Tensor):
    """adaLN gate: ``x * gate`` with per-sample ``gate [B, C]``."""
    if isinstance(x, SparseTensor):
        return x.replace(x.feats * _broadcast(x, gate_values))
    return x * _broadcast(x, gate_values)


def adaln_modulation(cond_channels: int, channels: int, chunks: int = 6) -> nn.Sequential:
    """``SiLU -> Linear(cond, chunks * channels)`` zero-initialised, so a modulated block starts as the identity;
    split its output with ``.chunk(chunks, dim=1)`` into per-sample shifts, scales and gates ``[B, channels]``."""
    layer = nn.Linear(cond_channels, chunks * channels)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return nn.Sequential(nn.SiLU(), layer)

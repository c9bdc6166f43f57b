"""The structure flow (SPEC section 4, image-to-3D, first stage): a rectified-flow transformer that generates the
dense structure latent ``[B, 8, r, r, r]`` (r = S / 4: 16 at S = 64) from image tokens; the structure VAE decodes
it to the occupancy whose cells become the sparse voxels of the second stage.

Architecture (TRELLIS' sparse-structure flow, ``ss_flow_img_dit_L_16l8``): cells (or p^3 patches) are tokens, a
linear layer embeds them and fixed 3D sinusoidal positions are added; the time ``1000 t`` goes through a 256-d
sinusoid and an MLP; N adaLN-Zero blocks (:class:`~sparseflex.nn.modulated.ModulatedTransformerCrossBlock`: self
attention with q/k RMS norm, cross-attention to the image tokens, MLP) and a final LayerNorm + zero-initialised
linear give the velocity in the input's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError, OptionError
from ..nn.embedding import TimestepEmbedder, sincos_position_embedding
from ..nn.modulated import FinalLayer, ModulatedTransformerCrossBlock
from .configs import ModelConfig


@dataclass
class StructureFlowConfig(ModelConfig):
    """Every size of a :class:`StructureFlow`; plain JSON-able values (:meth:`to_dict`) so checkpoints store it.

    ``resolution`` is the latent grid r, ``patch_size`` p the cells per token along each axis (r divisible by p),
    ``cond_channels`` the width of the image tokens. ``final_adaln`` adds DiT's time modulation to the output layer
    (TRELLIS has none).
    """
    resolution: int = 16
    in_channels: int = 8
    out_channels: int = 8
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 1
    qk_rms_norm: bool = True
    qk_rms_norm_cross: bool = False
    final_adaln: bool = False
    use_checkpoint: bool = False

    def __post_init__(self):
        for name in ("resolution", "in_channels", "out_channels", "model_channels", "cond_channels", "num_blocks",
                     "num_heads", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(f"structure flow {name} must be an integer >= 1; got {value!r}")
        if self.model_channels % self.num_heads:
            raise OptionError(f"model_channels ({self.model_channels}) must be divisible by num_heads "
                              f"({self.num_heads})")
        if self.resolution % self.patch_size:
            raise OptionError(f"resolution ({self.resolution}) must be divisible by patch_size ({self.patch_size})")
        if not self.mlp_ratio > 0:
            raise OptionError(f"mlp_ratio must be > 0; got {self.mlp_ratio}")

    @property
    def grid(self) -> int:
        """Tokens per axis, ``resolution / patch_size``."""
        return self.resolution // self.patch_size


STRUCTURE_FLOW_CONFIGS = {
    # TRELLIS-image-large's ss_flow_img_dit_L_16l8: 16^3 x 8 latent, 24 blocks of width 1024, 16 heads, qk RMS norm,
    # DINOv2 ViT-L tokens (1024 wide); 555,543,560 parameters
    "trellis": StructureFlowConfig(),
    # CPU-sized: the same architecture, narrower and shallower (cond 64 = the tiny image encoder's width)
    "small": StructureFlowConfig(model_channels=128, cond_channels=64, num_blocks=4, num_heads=4),
    "tiny": StructureFlowConfig(resolution=8, model_channels=64, cond_channels=64, num_blocks=2, num_heads=2),
}

StructureFlowConfig.kind, StructureFlowConfig.presets = "structure flow", STRUCTURE_FLOW_CONFIGS


def get_structure_flow_config(name: str, **overrides) -> StructureFlowConfig:
    """A copy of the named preset (``trellis``, ``small``, ``tiny``) with ``overrides`` applied."""
    return StructureFlowConfig.preset(name, **overrides)


def read_structure_flow_config(name_or_path: str) -> StructureFlowConfig:
    """A preset name or a JSON file of :class:`StructureFlowConfig` fields."""
    return StructureFlowConfig.read(name_or_path)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, r, r, r]`` -> tokens ``[B, (r/p)^3, C p^3]``: tokens in x-major raster order of the patch grid,
    channels ordered (c, i, j, k) within a patch."""
    b, c, *size = x.shape
    g = [s // p for s in size]
    x = x.reshape(b, c, g[0], p, g[1], p, g[2], p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, g[0] * g[1] * g[2], c * p ** 3)


def unpatchify(tokens: torch.Tensor, p: int, grid: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a cubic ``grid`` of patches: ``[B, grid^3, C p^3]`` -> ``[B, C, r, r, r]``."""
    b, _, cp = tokens.shape
    c = cp // p ** 3
    x = tokens.reshape(b, grid, grid, grid, c, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, c, grid * p, grid * p, grid * p)


class StructureFlow(nn.Module):
    """Velocity network of the structure flow: ``forward(x [B, C, r, r, r], t [B], cond [B, T, Cc])`` with ``t`` the
    flow time scaled by 1000 (:meth:`~sparseflex.models.flow.RectifiedFlow.loss`'s convention) and ``cond`` the image
    tokens (zeros = unconditional); returns ``[B, out_channels, r, r, r]``. A fresh model outputs exactly zero.
    """

    def __init__(self, config: StructureFlowConfig | str = "tiny"):
        super().__init__()
        cfg = get_structure_flow_config(config) if isinstance(config, str) else config
        self.config = cfg
        c, p = cfg.model_channels, cfg.patch_size
        self.t_embedder = TimestepEmbedder(c)
        self.input_layer = nn.Linear(cfg.in_channels * p ** 3, c)
        grid = torch.arange(cfg.grid)
        xyz = torch.stack(torch.meshgrid(grid, grid, grid, indexing="ij"), dim=-1).reshape(-1, 3)
        # fixed, so not saved: a checkpoint holds learned weights only
        self.register_buffer("pos_emb", sincos_position_embedding(xyz, c), persistent=False)
        self.blocks = nn.ModuleList(
            ModulatedTransformerCrossBlock(c, cfg.cond_channels, cfg.num_heads, cfg.mlp_ratio, cfg.qk_rms_norm,
                                           cfg.qk_rms_norm_cross, use_checkpoint=cfg.use_checkpoint)
            for _ in range(cfg.num_blocks))
        self.final_layer = FinalLayer(c, cfg.out_channels * p ** 3, modulated=cfg.final_adaln)
        self.reset_parameters()

    def reset_parameters(self):
        """DiT's initialisation: Xavier-uniform linears with zero biases, N(0, 0.02) time-MLP weights, adaLN-Zero
        blocks (:meth:`ModulatedTransformerCrossBlock.reset_parameters`) and a zero output layer."""
        nn.init.xavier_uniform_(self.input_layer.weight)
        nn.init.zeros_(self.input_layer.bias)
        for m in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        for block in self.blocks:
            block.reset_parameters()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        expected = (cfg.in_channels, *[cfg.resolution] * 3)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise InputError(f"structure flow input must be [B, {', '.join(map(str, expected))}]; "
                             f"got {tuple(x.shape)}")
        b = x.shape[0]
        if t.shape != (b,):
            raise InputError(f"structure flow time must be [{b}]; got {tuple(t.shape)}")
        if cond.dim() != 3 or len(cond) != b or cond.shape[2] != cfg.cond_channels:
            raise InputError(f"structure flow condition must be [{b}, T, {cfg.cond_channels}]; got {tuple(cond.shape)}")
        h = self.input_layer(patchify(x, cfg.patch_size)) + self.pos_emb.to(x.dtype)
        emb = self.t_embedder(t)
        for block in self.blocks:
            h = block(h, emb, cond)
        return unpatchify(self.final_layer(h, emb), cfg.patch_size, cfg.grid)

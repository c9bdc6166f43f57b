"""The structure VAE of image-to-3D (SPEC section 4): a dense 3D convolutional VAE of the sparse voxel STRUCTURE.

The image-to-3D generator first generates WHERE the SparseFlex latent lives: the occupancy grid ``[B, 1, S, S, S]``
(S = 64 in TRELLIS) of the active latent voxels. This VAE compresses it to a ``latent_channels``-channel grid at
``S / 4`` (8 x 16^3 in TRELLIS), on which the structure flow runs; decoding gives one logit per voxel, occupied where
it is > 0. The design follows TRELLIS' sparse structure VAE (``SparseStructureEncoder`` / ``SparseStructureDecoder``,
config ``ss_vae_conv3d_16l8_fp16``):

* encoder: conv 3^3 (1 -> C0); per stage ``num_res_blocks`` residual blocks, then a stride-2 conv with a 2^3 kernel
  to the next stage's width (TRELLIS' ``conv`` downsampling, not average pooling); ``num_res_blocks_middle`` blocks;
  channel LayerNorm, SiLU, conv 3^3 to ``2 * latent_channels`` = mean and log-variance (not clamped, as TRELLIS);
* decoder: conv 3^3 (latent -> C0); middle blocks; per stage residual blocks, then a conv 3^3 to ``8 C_next``
  channels and a 3D pixel shuffle to twice the resolution; channel LayerNorm, SiLU, conv 3^3 to one logit;
* residual block: ``x + conv2(SiLU(LN(conv1(SiLU(LN(x))))))`` with a zero-initialised ``conv2`` (the block starts as
  its skip path) and a 1^3 conv skip when the width changes; LN is a LayerNorm over each voxel's channel vector
  (affine, eps 1e-5, computed in float32).

Parameter names mirror TRELLIS' (``encoder.input_layer``, ``encoder.blocks.i.conv1``, ``encoder.middle_block.i``,
``encoder.out_layer.2``, ``decoder.blocks.i.conv``, ...), and its pixel-shuffle channel order, so its encoder and
decoder state dicts should map onto ``encoder.`` / ``decoder.`` one to one (checked against TRELLIS' code, not
against a released checkpoint).

Training (:func:`structure_vae_loss`): soft Dice on the sigmoid of the logits plus ``1e-3`` KL to N(0, I), TRELLIS'
``loss_type: dice`` and ``lambda_kl`` (its run: AdamW lr 1e-4, no weight decay, gradient clipping). Soft Dice has
almost no gradient once every logit saturates (all occupied or all empty): in short CPU runs lr 2e-3 from the first
step sometimes got stuck there, lr 1e-3 with a 20-step warm-up and clipping at norm 1 did not. Helpers turn sparse voxel coordinates into grids and back
(:func:`occupancy_grid`, :func:`grid_to_coords`) and score reconstructions (:func:`dice`, :func:`iou`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, OptionError
from ..nn.transformer import _Checkpointed
from .configs import ModelConfig
from .upsample import zero_init

#: Training losses of the reconstruction term (TRELLIS offers both; its released config uses ``dice``).
LOSS_TYPES = ("dice", "bce")


def check_resolution(resolution: int, factor: int) -> int:
    """Raise :class:`OptionError` unless ``resolution`` is a positive multiple of ``factor``."""
    if not isinstance(resolution, int) or resolution < factor or resolution % factor:
        raise OptionError(f"structure resolution must be a positive multiple of {factor}; got {resolution!r}")
    return resolution


@dataclass
class StructureVAEConfig(ModelConfig):
    """Every size of a :class:`StructureVAE`.

    ``resolution`` is only the default grid size S (the model is fully convolutional, no weight depends on it); the
    latent grid is ``S / downsample_factor`` with ``downsample_factor = 2 ** (len(encoder_channels) - 1)``.
    """
    resolution: int = 64
    latent_channels: int = 8
    encoder_channels: tuple[int, ...] = (32, 128, 512)
    decoder_channels: tuple[int, ...] = (512, 128, 32)
    num_res_blocks: int = 2           # per stage
    num_res_blocks_middle: int = 2
    use_checkpoint: bool = False      # activation checkpointing of the residual blocks while training

    def __post_init__(self):
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)
        if not self.encoder_channels or min(self.encoder_channels + self.decoder_channels, default=0) < 1:
            raise OptionError("a structure VAE needs at least one stage and positive channel counts; got "
                              f"encoder {list(self.encoder_channels)}, decoder {list(self.decoder_channels)}")
        # the decoder must upsample exactly as often as the encoder downsamples
        if len(self.decoder_channels) != len(self.encoder_channels):
            raise OptionError(f"encoder_channels and decoder_channels need as many stages; got "
                              f"{len(self.encoder_channels)} and {len(self.decoder_channels)}")
        if self.latent_channels < 1:
            raise OptionError(f"latent_channels must be >= 1; got {self.latent_channels}")
        if self.num_res_blocks < 0 or self.num_res_blocks_middle < 0:
            raise OptionError(f"residual block counts must be >= 0; got {self.num_res_blocks} per stage, "
                              f"{self.num_res_blocks_middle} in the middle")
        check_resolution(self.resolution, self.downsample_factor)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_channels) - 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.downsample_factor


STRUCTURE_VAE_CONFIGS = {
    # TRELLIS' ss_vae_conv3d_16l8: 64^3 -> 8 x 16^3
    "trellis": StructureVAEConfig(),
    # CPU-sized: the same architecture, narrower and one block per stage
    "small": StructureVAEConfig(resolution=64, encoder_channels=(16, 32, 64), decoder_channels=(64, 32, 16),
                                num_res_blocks=1, num_res_blocks_middle=1),
    "tiny": StructureVAEConfig(resolution=32, encoder_channels=(8, 16, 32), decoder_channels=(32, 16, 8),
                               num_res_blocks=1, num_res_blocks_middle=1),
}

StructureVAEConfig.kind, StructureVAEConfig.presets = "structure VAE", STRUCTURE_VAE_CONFIGS


def get_structure_vae_config(name: str, **overrides) -> StructureVAEConfig:
    """A copy of the named config (``trellis``, ``small``, ``tiny``) with ``overrides`` applied."""
    return StructureVAEConfig.preset(name, **overrides)


# -- building blocks --------------------------------------------------------------------------------------------------

class ChannelLayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channels of every voxel of a ``[B, C, D, H, W]`` tensor (TRELLIS' ``ChannelLayerNorm32``:
    affine, eps 1e-5, statistics in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1).float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.to(x.dtype).movedim(-1, 1)


def pixel_shuffle_3d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """``[B, C f^3, D, H, W] -> [B, C, f D, f H, f W]``: input channel ``c f^3 + (i f + j) f + k`` becomes output
    voxel ``(f d + i, f h + j, f w + k)`` of channel ``c`` (TRELLIS' order)."""
    b, c, d, h, w = x.shape
    f = factor
    if c % f ** 3:
        raise InputError(f"pixel_shuffle_3d needs channels divisible by {f ** 3}; got {c}")
    x = x.reshape(b, c // f ** 3, f, f, f, d, h, w)
    # interleave each sub-voxel axis after its spatial axis: (d, i), (h, j), (w, k)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c // f ** 3, d * f, h * f, w * f)


class ResBlock3d(_Checkpointed):
    """``skip(x) + conv2(SiLU(LN(conv1(SiLU(LN(x))))))``, 3^3 convs; ``conv2`` zero-initialised (TRELLIS), ``skip``
    a 1^3 conv when the width changes, else the identity."""

    def __init__(self, channels: int, out_channels: int | None = None, use_checkpoint: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.norm1 = ChannelLayerNorm3d(channels, eps=1e-5)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm3d(out_channels, eps=1e-5)
        self.conv2 = zero_init(nn.Conv3d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if out_channels != channels else nn.Identity()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class Downsample3d(nn.Module):
    """Halve the resolution with a 2^3 convolution of stride 2 (TRELLIS' ``conv`` mode)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Double the resolution: conv 3^3 to ``8 * out_channels`` then :func:`pixel_shuffle_3d` (TRELLIS' ``conv``
    mode)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


def _out_layer(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(ChannelLayerNorm3d(channels, eps=1e-5), nn.SiLU(), nn.Conv3d(channels, out_channels, 3,
                                                                                      padding=1))


class StructureEncoder(nn.Module):
    """Occupancy ``[B, 1, S, S, S]`` -> ``[B, 2 * latent_channels, S / f, ...]`` (mean and log-variance stacked)."""

    def __init__(self, c: StructureVAEConfig):
        super().__init__()
        ch = c.encoder_channels
        self.input_layer = nn.Conv3d(1, ch[0], 3, padding=1)
        blocks = []
        for i, width in enumerate(ch):
            blocks += [ResBlock3d(width, use_checkpoint=c.use_checkpoint) for _ in range(c.num_res_blocks)]
            if i + 1 < len(ch):
                blocks.append(Downsample3d(width, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[-1], use_checkpoint=c.use_checkpoint)
                                            for _ in range(c.num_res_blocks_middle)])
        self.out_layer = _out_layer(ch[-1], 2 * c.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(self.middle_block(h))


class StructureDecoder(nn.Module):
    """Latent ``[B, latent_channels, S / f, ...]`` -> occupancy logits ``[B, 1, S, S, S]``."""

    def __init__(self, c: StructureVAEConfig):
        super().__init__()
        ch = c.decoder_channels
        self.input_layer = nn.Conv3d(c.latent_channels, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[0], use_checkpoint=c.use_checkpoint)
                                            for _ in range(c.num_res_blocks_middle)])
        blocks = []
        for i, width in enumerate(ch):
            blocks += [ResBlock3d(width, use_checkpoint=c.use_checkpoint) for _ in range(c.num_res_blocks)]
            if i + 1 < len(ch):
                blocks.append(Upsample3d(width, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = _out_layer(ch[-1], 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.middle_block(self.input_layer(z))
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h)


class StructureVAEOutput(NamedTuple):
    """:meth:`StructureVAE.forward`: occupancy ``logits [B, 1, S, S, S]``, the latent ``z`` it decoded and the
    posterior ``mean`` / ``logvar`` ``[B, latent_channels, S / f, ...]``."""
    logits: torch.Tensor
    z: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor


class StructureVAE(nn.Module):
    """The structure VAE; ``config`` is a :class:`StructureVAEConfig` or a named config (``trellis``, ``small``,
    ``tiny``). Any grid size S that is a multiple of ``config.downsample_factor`` works."""

    def __init__(self, config: StructureVAEConfig | str = "small"):
        super().__init__()
        self.config = get_structure_vae_config(config) if isinstance(config, str) else config
        self.encoder = StructureEncoder(self.config)
        self.decoder = StructureDecoder(self.config)

    def encode(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, logvar)``, each ``[B, latent_channels, S / f, S / f, S / f]``, of a float occupancy
        ``grid [B, 1, S, S, S]`` (1 = occupied)."""
        if grid.dim() != 5 or grid.shape[1] != 1 or len(set(grid.shape[2:])) != 1:
            raise InputError(f"a structure grid is [B, 1, S, S, S]; got {tuple(grid.shape)}")
        check_resolution(int(grid.shape[-1]), self.config.downsample_factor)
        return self.encoder(grid.to(self.encoder.input_layer.weight.dtype)).chunk(2, dim=1)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A latent drawn from the posterior: ``mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` from
        ``generator`` (on ``mean``'s device)."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Occupancy logits ``[B, 1, S, S, S]`` of latents ``z [B, latent_channels, S / f, ...]``; a voxel is
        occupied where its logit is > 0 (:func:`grid_to_coords`)."""
        if z.dim() != 5 or z.shape[1] != self.config.latent_channels:
            raise InputError(f"a structure latent is [B, {self.config.latent_channels}, R, R, R]; "
                             f"got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, grid: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> StructureVAEOutput:
        """Encode, sample the posterior (or take its mean), decode."""
        mean, logvar = self.encode(grid)
        z = self.sample(mean, logvar, generator) if sample_posterior else mean
        return StructureVAEOutput(self.decode(z), z, mean, logvar)


# -- training loss and metrics ----------------------------------------------------------------------------------------

def soft_dice_loss(logits: torch.Tensor, grid: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p g) + smooth) / (sum p + sum g + smooth)`` with ``p = sigmoid(logits)``, the sums over the
    WHOLE batch (TRELLIS' form: one ratio per batch, not a mean of per-item ratios)."""
    p = torch.sigmoid(logits.float())
    g = grid.float()
    return 1 - (2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL of the diagonal Gaussian posterior to N(0, I), averaged over EVERY element (batch, channel, voxel), as
    TRELLIS' structure VAE does (the SparseFlex VAE's :func:`~sparseflex.models.vae.kl_divergence` sums channels)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean * mean + logvar.exp() - logvar - 1).mean()


def structure_vae_loss(logits: torch.Tensor, grid: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                       kl_weight: float = 1e-3, loss_type: str = "dice") -> tuple[torch.Tensor, dict]:
    """Training loss ``recon + kl_weight * KL`` and its detached parts ``{"dice" or "bce", "kl"}``.

    ``recon`` is :func:`soft_dice_loss` (TRELLIS' released ``loss_type: dice``, ``lambda_kl: 1e-3``) or the mean
    BCE with logits (``loss_type="bce"``); KL is :func:`gaussian_kl`.
    """
    if loss_type not in LOSS_TYPES:
        raise OptionError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if logits.shape != grid.shape:
        raise InputError(f"logits {tuple(logits.shape)} and grid {tuple(grid.shape)} differ in shape")
    if loss_type == "dice":
        recon = soft_dice_loss(logits, grid)
    else:
        recon = F.binary_cross_entropy_with_logits(logits.float(), grid.float())
    kl = gaussian_kl(mean, logvar)
    total = recon + kl_weight * kl
    return total, {loss_type: recon.detach(), "kl": kl.detach()}


def _per_item_counts(pred: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if pred.shape != grid.shape:
        raise InputError(f"prediction {tuple(pred.shape)} and grid {tuple(grid.shape)} differ in shape")
    p, g = pred.bool().flatten(1), grid.bool().flatten(1)
    return (p & g).sum(1).double(), p.sum(1).double(), g.sum(1).double()


def dice(pred: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Dice ``2 |P & G| / (|P| + |G|)`` per batch item ``[B]`` of a boolean prediction and an occupancy grid
    (nonzero = occupied), both ``[B, ...]``; 1 where both are empty."""
    both, p, g = _per_item_counts(pred, grid)
    return torch.where(p + g > 0, 2 * both / (p + g).clamp(min=1), torch.ones_like(both))


def iou(pred: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Intersection over union ``|P & G| / |P | G|`` per batch item ``[B]`` (arguments as :func:`dice`); 1 where
    both are empty."""
    both, p, g = _per_item_counts(pred, grid)
    union = p + g - both
    return torch.where(union > 0, both / union.clamp(min=1), torch.ones_like(both))


# -- sparse voxels <-> grids ------------------------------------------------------------------------------------------

def occupancy_grid(coords: torch.Tensor, resolution: int, batch_size: int | None = None) -> torch.Tensor:
    """Float occupancy ``[B, 1, S, S, S]`` (1 at every voxel of ``coords``, else 0) of integer voxel coordinates
    ``[N, 3]`` (one item) or ``[N, 4]`` (batch, x, y, z); grid index order ``[b, 0, x, y, z]``. ``B`` defaults to
    the largest batch index + 1. Raises :class:`InputError` for coordinates outside the grid."""
    if coords.dim() != 2 or coords.shape[1] not in (3, 4):
        raise InputError(f"voxel coordinates must be [N, 3] or [N, 4]; got {tuple(coords.shape)}")
    if resolution < 1:
        raise OptionError(f"resolution must be >= 1; got {resolution}")
    c = coords.long()
    if c.shape[1] == 3:
        c = torch.cat([c.new_zeros(len(c), 1), c], dim=1)
    b = int(c[:, 0].max()) + 1 if len(c) else 1
    batch_size = b if batch_size is None else batch_size
    if len(c) and (bool((c[:, 1:] < 0).any()) or bool((c[:, 1:] >= resolution).any())
                   or int(c[:, 0].min()) < 0 or b > batch_size):
        raise InputError(f"voxel coordinates outside a batch of {batch_size} grids of {resolution}^3")
    grid = torch.zeros(batch_size, 1, resolution, resolution, resolution, device=coords.device)
    grid[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]] = 1.0
    return grid


def grid_to_coords(logits_or_grid: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Voxels ``[M, 4]`` int64 (batch, x, y, z; sorted) whose value in ``[B, 1, S, S, S]`` is > ``threshold``: the
    occupied voxels of decoded logits, or the nonzero ones of an occupancy grid, with the default 0."""
    if logits_or_grid.dim() != 5 or logits_or_grid.shape[1] != 1:
        raise InputError(f"a structure grid is [B, 1, S, S, S]; got {tuple(logits_or_grid.shape)}")
    return torch.nonzero(logits_or_grid[:, 0] > threshold)

"""The SparseFlex VAE (SPEC section 4): surface points -> 8-channel sparse latent -> 53-channel SparseFlex head.

Encoder: local PointNet per latent voxel -> linear -> + sinusoidal positions -> shifted-window sparse transformer ->
LayerNorm -> zero-initialised linear = mean and log-variance. Decoder: linear -> + positions -> sparse transformer ->
self-pruning upsampling modules -> zero-initialised head. Parameter names equal the TripoSF release's, so its
checkpoint loads as it is (:meth:`SparseFlexVAE.from_triposf`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError, OptionError
from ..flexicubes.representation import HEAD_CHANNELS, SparseFlex
from ..nn import (AbsolutePositionEmbedder, LocalPointNet, SparseLayerNorm, SparseTensor, SparseTransformerBlock,
                  local_point_features)
from ..sparse.coords import VoxelHash, batched
from .configs import VAEConfig, get_config
from .upsample import SelfPruningUpsample, zero_init

LOGVAR_RANGE = (-30.0, 20.0)
#: Decoding modes: GroupNorm statistics over the whole sample (training's), or the release's per-chunk ones.
CHUNKINGS = ("whole", "release")


@dataclass
class PruneOutput:
    """One upsampling level: every candidate child ``coords [M, 4]``, its occupancy ``logits [M]``, at
    ``resolution`` (the target of the pruning BCE)."""
    coords: torch.Tensor
    logits: torch.Tensor
    resolution: int


@dataclass
class VAEDecoding:
    """Decoder output: voxels ``coords [N, 4]`` at ``resolution`` (rows sorted by batch), their ``head [N, 53]``
    (SPEC section 1 layout) and the pruning levels (empty after chunked decoding). ``repeated_voxels``: a voxel
    may come in several rows (the release's chunking)."""
    coords: torch.Tensor
    head: torch.Tensor
    resolution: int
    prune: list[PruneOutput]
    batch_size: int
    repeated_voxels: bool = False

    def rows(self, i: int) -> slice:
        """Rows of batch item ``i``."""
        b = self.coords[:, 0].contiguous()
        ends = torch.searchsorted(b, torch.tensor([i, i + 1], device=b.device)).tolist()
        return slice(ends[0], ends[1])

    def sparseflex(self, i: int = 0) -> SparseFlex:
        """The SparseFlex of batch item ``i`` (differentiable in the head)."""
        rows = self.rows(i)
        coords = self.coords[rows].clone()
        coords[:, 0] = 0
        return SparseFlex.from_head(coords, self.resolution, self.head[rows], self.repeated_voxels)


def kl_divergence(mean: SparseTensor, logvar: SparseTensor) -> torch.Tensor:
    """KL of the per-voxel diagonal Gaussians to N(0, I), summed over channels, averaged over voxels."""
    m, lv = mean.feats, logvar.feats
    return 0.5 * (m * m + lv.exp() - 1 - lv).sum(1).mean()


def occupancy_bce(coords: torch.Tensor, logits: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
    """BCE of candidate children's logits against the ground truth: a child is positive when it is in ``occupied``."""
    target = (VoxelHash(batched(occupied.to(coords.device))).lookup(coords) >= 0).to(logits.dtype)
    return nn.functional.binary_cross_entropy_with_logits(logits, target)


def pruning_bce(prune: list[PruneOutput], occupancy: list[torch.Tensor]) -> torch.Tensor:
    """Mean over levels of :func:`occupancy_bce`."""
    return torch.stack([occupancy_bce(level.coords, level.logits, occ) for level, occ in zip(prune, occupancy)]).mean()


class _Trunk(nn.Module):
    """``input_layer`` + sinusoidal positions, then transformer blocks with windows shifted in odd blocks."""

    def __init__(self, in_channels: int, num_blocks: int, config: VAEConfig):
        super().__init__()
        c, w = config.model_channels, config.window_size
        self.input_layer = nn.Linear(in_channels, c)
        self.pos_embedder = AbsolutePositionEmbedder(c)
        self.blocks = nn.ModuleList([
            SparseTransformerBlock(c, config.num_heads, config.mlp_ratio, "window", w, shift=(w // 2) * (i % 2),
                                   use_checkpoint=config.use_checkpoint)
            for i in range(num_blocks)])

    def trunk(self, x: SparseTensor) -> SparseTensor:
        h = self.input_layer(x.feats)
        h = x.replace(h + self.pos_embedder(x).to(h.dtype))
        for block in self.blocks:
            h = block(h)
        return h


class SparseFlexEncoder(_Trunk):
    """Per-voxel PointNet features -> (mean, logvar) of the latent, both ``SparseTensor`` on the same voxels."""

    def __init__(self, config: VAEConfig):
        super().__init__(config.pointnet_channels, config.encoder_blocks, config)
        # F.layer_norm's default eps, as in the TRELLIS-derived release encoder (the blocks use 1e-6)
        self.norm = SparseLayerNorm(config.model_channels, eps=1e-5, elementwise_affine=False)
        self.out_layer = zero_init(nn.Linear(config.model_channels, 2 * config.latent_channels))

    def forward(self, x: SparseTensor) -> tuple[SparseTensor, SparseTensor]:
        out = self.out_layer(self.norm(self.trunk(x)).feats)
        mean, logvar = out.chunk(2, dim=1)
        return x.replace(mean), x.replace(logvar.clamp(*LOGVAR_RANGE))


class SparseFlexDecoder(_Trunk):
    """Latent -> transformer -> self-pruning upsampling -> 53-channel head per output voxel."""

    def __init__(self, config: VAEConfig):
        super().__init__(config.latent_channels, config.decoder_blocks, config)
        chans = (config.model_channels, *config.upsample_channels)
        self.upsample = nn.ModuleList([
            SelfPruningUpsample(chans[i], chans[i + 1], config.norm_groups, config.use_checkpoint)
            for i in range(len(config.upsample_channels))])
        self.out_layer = zero_init(nn.Linear(chans[-1], HEAD_CHANNELS))

    def forward(self, z: SparseTensor, resolution: int, occupancy: list[torch.Tensor] | None = None,
                prune: bool = True) -> VAEDecoding:
        if occupancy is not None and len(occupancy) < len(self.upsample):
            raise InputError(f"occupancy has {len(occupancy)} levels; the decoder needs {len(self.upsample)}")
        h = self.trunk(z)
        levels = []
        for k, up in enumerate(self.upsample):
            resolution *= 2
            target = None if occupancy is None else batched(occupancy[k].to(h.device))
            h, candidates, logits = up(h, target, prune)
            levels.append(PruneOutput(candidates, logits, resolution))
        return VAEDecoding(h.coords, self.out_layer(h.feats), resolution, levels, z.batch_size)

    @torch.no_grad()
    def forward_chunked(self, z: SparseTensor, resolution: int, chunk_size: int, prune: bool = True) -> VAEDecoding:
        """Inference decoding with the upsampling done ``chunk_size^3`` latent voxels at a time (same result as
        :meth:`forward` without occupancy, up to rounding; memory follows the chunk, not the output)."""
        h = self.trunk(z)
        for k, up in enumerate(self.upsample):
            last = k == len(self.upsample) - 1
            h = up.forward_chunked(h, chunk_size * 2 ** k, post=self.out_layer if last else None, prune=prune)
        return VAEDecoding(h.coords, h.feats, resolution * 2 ** len(self.upsample), [], z.batch_size)

    @torch.no_grad()
    def forward_release_chunks(self, z: SparseTensor, resolution: int, prune: bool = False) -> VAEDecoding:
        """The TripoSF release's inference decoding, reproduced exactly (not equal to :meth:`forward`).

        The latent grid is split into ``n^3`` chunks (n = 4, or 8 from 150,000 latent voxels), each grown by 4
        latent voxels on every side; each padded chunk is upsampled on its own (GroupNorm statistics per chunk, no
        neighbours across its border) and keeps the output voxels in ``[f * start, f * end + f - 1)`` per axis
        (``f`` the upsampling factor). Voxels on a seam therefore come out twice, once from each chunk, with
        different features; rows are in chunk order within each batch item (the owning chunk's copy last), and
        :meth:`SparseFlex.from_head` averages every copy into the shared corners as the release does.
        """
        h = self.trunk(z)
        f = 2 ** len(self.upsample)
        coords, feats = [], []
        for rows, start, end in release_chunks(h.coords, resolution):
            part = SparseTensor(h.coords[rows], h.feats[rows], h.batch_size)
            for up in self.upsample:
                part = up.infer(part, prune)
            xyz = part.coords[:, 1:]
            keep = ((xyz >= f * start) & (xyz < f * end + f - 1)).all(1)
            coords.append(part.coords[keep])
            feats.append(self.out_layer(part.feats[keep]))
        if not coords:
            coords, feats = [h.coords[:0]], [self.out_layer(h.feats.new_zeros(0, self.out_layer.in_features))]
        coords, feats = torch.cat(coords), torch.cat(feats)
        order = torch.sort(coords[:, 0], stable=True).indices  # by batch item, chunk order kept within each
        return VAEDecoding(coords[order], feats[order], resolution * f, [], z.batch_size, repeated_voxels=True)


RELEASE_CHUNK_PADDING = 4
RELEASE_FINE_CHUNKS_FROM = 150_000


def release_chunks(coords: torch.Tensor, resolution: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The release's decoding chunks of latent voxels ``coords [N, 4]`` at ``resolution``: per non-empty chunk, in
    (i, j, k) order, its rows (padding included) and its own (unpadded) bounds ``[start, end)`` per axis."""
    n = 8 if len(coords) >= RELEASE_FINE_CHUNKS_FROM else 4
    side, pad = resolution // n, RELEASE_CHUNK_PADDING
    if resolution % n or side % pad:
        raise OptionError(f"release chunking splits the latent grid into {n}^3 chunks whose side is a multiple of "
                          f"{pad}: it needs a latent resolution divisible by {n * pad}; got {resolution}")
    xyz = coords[:, 1:]
    pieces = []
    for i in range(n):
        for j in range(n):
            for k in range(n):
                start = torch.tensor([i, j, k], device=coords.device) * side
                end = start + side
                inside = ((xyz >= (start - pad).clamp(min=0)) & (xyz < (end + pad).clamp(max=resolution))).all(1)
                rows = inside.nonzero().squeeze(1)
                if len(rows):
                    pieces.append((rows, start, end))
    return pieces


class SparseFlexVAE(nn.Module):
    """The SparseFlex VAE; ``config`` is a :class:`VAEConfig` or a named config (``triposf``, ``small``, ``tiny``)."""

    def __init__(self, config: VAEConfig | str):
        super().__init__()
        self.config = get_config(config) if isinstance(config, str) else config
        c = self.config
        self.local_pc_encoder = LocalPointNet(6, c.pointnet_hidden, c.pointnet_channels, c.pointnet_blocks,
                                              c.pointnet_pool)
        self.encoder = SparseFlexEncoder(c)
        self.decoder = SparseFlexDecoder(c)

    def encode(self, points: torch.Tensor, normals: torch.Tensor, point_batch: torch.Tensor, coords: torch.Tensor,
               resolution: int | None = None) -> tuple[SparseTensor, SparseTensor]:
        """Latent (mean, logvar) on the active voxels ``coords [N, 4]`` (batch, x, y, z; rows sorted by batch) at
        ``resolution`` (default: the config's latent resolution) from surface ``points [P, 3]`` in the cube
        [-0.5, 0.5]^3, unit ``normals [P, 3]`` and ``point_batch [P]``. Points outside the active voxels are ignored.
        """
        return self.encoder(self.point_features(points, normals, point_batch, coords, resolution))

    def point_features(self, points: torch.Tensor, normals: torch.Tensor, point_batch: torch.Tensor,
                       coords: torch.Tensor, resolution: int | None = None) -> SparseTensor:
        """The local PointNet's feature per active voxel (the encoder's input; arguments as :meth:`encode`)."""
        r = resolution or self.config.latent_resolution
        coords = batched(coords)
        if len(points) != len(normals) or len(points) != len(point_batch):
            raise InputError(f"{len(points)} points, {len(normals)} normals and {len(point_batch)} batch indices")
        vox = ((points.detach() + 0.5) * r).floor().long().clamp_(0, r - 1)
        index = VoxelHash(coords).lookup(torch.cat([point_batch.long()[:, None], vox], dim=1))
        inside = index >= 0
        with torch.autocast(points.device.type, enabled=False):  # the PointNet runs in float32 under autocast too
            feats = local_point_features(points[inside].float(), normals[inside].float(), vox[inside], r)
            return SparseTensor(coords, self.local_pc_encoder(feats, index[inside], len(coords)))

    def decode(self, z: SparseTensor, occupancy: list[torch.Tensor] | None = None, resolution: int | None = None,
               chunk_size: int | None = None, prune: bool | None = None, chunking: str = "whole") -> VAEDecoding:
        """Decode a latent at ``resolution`` (default: the config's latent resolution).

        ``occupancy`` (training) lists the ground-truth occupied voxels ``[M, 4]`` at each upsampled resolution: the
        children kept are those (teacher forcing). Without it children with logit >= 0 are kept when ``prune`` is
        on (default: the config's ``prune``), all of them when it is off. ``chunking="whole"`` takes GroupNorm
        statistics over each whole sample, as in training; ``chunk_size`` (inference only) then upsamples that many
        latent voxels per axis at a time to bound memory, with the same result. ``chunking="release"`` reproduces
        the TripoSF release's chunked decoding (:meth:`SparseFlexDecoder.forward_release_chunks`).
        """
        r = resolution or self.config.latent_resolution
        prune = self.config.prune if prune is None else prune
        if chunking not in CHUNKINGS:
            raise OptionError(f"chunking must be one of {', '.join(CHUNKINGS)}; got {chunking!r}")
        if (chunk_size is not None or chunking == "release") and occupancy is not None:
            raise InputError("chunked decoding is for inference; it takes no occupancy")
        if chunking == "release":
            return self.decoder.forward_release_chunks(z, r, prune)
        if chunk_size is not None:
            return self.decoder.forward_chunked(z, r, chunk_size, prune)
        return self.decoder(z, r, occupancy, prune)

    @staticmethod
    def sample(mean: SparseTensor, logvar: SparseTensor, generator: torch.Generator | None = None) -> SparseTensor:
        """A posterior sample ``z = mean + exp(logvar / 2) * eps`` (what the release decodes at inference); the noise
        is drawn on the CPU from ``generator``, so a seed gives the same latent on every device."""
        eps = torch.randn(mean.feats.shape, generator=generator, dtype=mean.feats.dtype)
        return mean.replace(mean.feats + torch.exp(0.5 * logvar.feats) * eps.to(mean.feats.device))

    def forward(self, points, normals, point_batch, coords, occupancy=None, sample_posterior: bool = True,
                resolution: int | None = None) -> tuple[VAEDecoding, SparseTensor, SparseTensor]:
        """Encode, sample ``z = mean + exp(logvar / 2) * eps`` (or take the mean) and decode."""
        mean, logvar = self.encode(points, normals, point_batch, coords, resolution)
        z = self.sample(mean, logvar) if sample_posterior else mean
        return self.decode(z, occupancy, resolution), mean, logvar

    # -- checkpoints (see sparseflex.models.checkpoint) -----------------------------------------------------------
    @classmethod
    def from_triposf(cls, path: str | os.PathLike, device=None) -> "SparseFlexVAE":
        """The public TripoSF VAE (``pretrained_TripoSFVAE_256i1024o.safetensors``) with every key and shape checked."""
        from .checkpoint import load_model
        return load_model(path, config="triposf", device=device)

    def load_state(self, path: str | os.PathLike) -> "SparseFlexVAE":
        """Load weights from a safetensors file or a training checkpoint (EMA weights when present), strictly."""
        from .checkpoint import load_weights, read_checkpoint
        load_weights(self, read_checkpoint(path).state, str(path))
        return self

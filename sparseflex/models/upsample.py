"""The self-pruning upsampling module of the SparseFlex decoder (SPEC section 4) and its chunked inference.

Each voxel becomes its 8 children (features copied), a residual stack of submanifold convolutions refines them and
a pruning head scores every child; children scoring below 0 are dropped (or, in training, the children the ground
truth does not occupy; or, with pruning off as in the TripoSF release's inference, none). State-dict names follow the TripoSF checkpoint: ``act_layers.0`` (GroupNorm on the input),
``out_layers.0`` / ``.1`` / ``.3`` (conv, GroupNorm, zero-initialised conv), ``skip_connection``,
``pruning_head.mlp.0`` / ``.2``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import SparseConv3d, SparseGroupNorm, SparseSiLU, SparseTensor, sparse_subdivide
from ..sparse.coords import VoxelHash, coords_to_keys


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (a branch that starts as a no-op)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class PruningHead(nn.Module):
    """Occupancy logit per voxel: ``Linear(C, 4C) -> GELU (tanh approximation, as the release) -> Linear(4C, 1)``, the
    last layer zero-initialised (a fresh head scores 0, which keeps every child)."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(approximate="tanh"),
                                 zero_init(nn.Linear(4 * channels, 1)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mlp(feats).squeeze(1)


class SelfPruningUpsample(nn.Module):
    """x2 per axis: ``skip(sub(x)) + conv3(SiLU(GN(conv0(sub(SiLU(GN(x)))))))``, then children are pruned.

    ``sub`` copies each voxel's features to its 8 children; the GroupNorm on the input is taken before subdividing,
    which is the same thing (8 copies leave each group's mean and variance unchanged) on 8 times fewer rows.
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32, use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.act_layers = nn.Sequential(SparseGroupNorm(num_groups, in_channels), SparseSiLU())
        self.out_layers = nn.Sequential(SparseConv3d(in_channels, out_channels, 3),
                                        SparseGroupNorm(num_groups, out_channels), SparseSiLU(),
                                        zero_init(SparseConv3d(out_channels, out_channels, 3)))
        self.skip_connection = SparseConv3d(in_channels, out_channels, 1)
        self.pruning_head = PruningHead(out_channels)

    def children_features(self, x: SparseTensor) -> SparseTensor:
        """Features of all ``8 N`` children (before pruning), rows voxel-major as in :func:`sparse_subdivide`."""
        fine = sparse_subdivide(x)
        if self.use_checkpoint and torch.is_grad_enabled():
            return fine.replace(checkpoint(self._children_feats, x, fine, use_reentrant=False))
        return fine.replace(self._children_feats(x, fine))

    def _children_feats(self, x: SparseTensor, fine: SparseTensor) -> torch.Tensor:
        h = fine.replace(self.act_layers(x).feats.repeat_interleave(8, dim=0))
        return (self.out_layers(h) + self.skip_connection(fine)).feats

    def forward(self, x: SparseTensor, target: torch.Tensor | None = None, prune: bool = True
                ) -> tuple[SparseTensor, torch.Tensor, torch.Tensor]:
        """Returns the kept children, and the coordinates ``[8N, 4]`` and logits ``[8N]`` of every candidate child.

        With ``target [M, 4]`` (ground-truth occupied voxels at the children's resolution) the children in it are
        kept (teacher forcing); otherwise those with logit >= 0, or all of them when ``prune`` is off.
        """
        h = self.children_features(x)
        logits = self.pruning_head(h.feats)
        if target is not None:
            return h.select(VoxelHash(target).lookup(h.coords) >= 0), h.coords, logits
        if not prune:
            return h, h.coords, logits
        return h.select(logits.detach() >= 0), h.coords, logits

    @torch.no_grad()
    def infer(self, x: SparseTensor, prune: bool = True) -> SparseTensor:
        """The kept children of :meth:`forward` at inference (no pruning head is evaluated when ``prune`` is off)."""
        h = self.children_features(x)
        return h.select(self.pruning_head(h.feats) >= 0) if prune else h

    # -- chunked inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_chunked(self, x: SparseTensor, side: int,
                        post: Callable[[torch.Tensor], torch.Tensor] | None = None, prune: bool = True
                        ) -> SparseTensor:
        """The kept children of :meth:`infer`, computed ``side^3`` input voxels at a time.

        Each chunk is extended by a halo of one input voxel, enough for the two 3^3 convolutions of the children;
        the inner GroupNorm, whose statistics span the whole sample, gets them from a first pass over the chunks.
        ``post`` maps each chunk's kept features (e.g. the output head). Rows come out sorted by voxel key.
        """
        act = self.act_layers(x)
        pieces = chunk_rows(x.coords, side, halo=1)
        norm = self.out_layers[1]
        sums = torch.zeros(3, x.batch_size, norm.num_groups, dtype=torch.float64, device=x.device)
        for rows, core in pieces:  # pass 1: statistics of the inner GroupNorm over the core children
            a = self.out_layers[0](sparse_subdivide(SparseTensor(x.coords[rows], act.feats[rows], x.batch_size)))
            core8 = core.repeat_interleave(8)
            sums += _group_sums(a.feats[core8], a.coords[core8, 0], x.batch_size, norm.num_groups)
        mean, var = _mean_var(sums)
        coords, feats = [], []
        for rows, core in pieces:  # pass 2: the children with whole-sample statistics
            sub = SparseTensor(x.coords[rows], x.feats[rows], x.batch_size)
            fine = sparse_subdivide(sub)
            a = self.out_layers[0](fine.replace(act.feats[rows].repeat_interleave(8, dim=0)))
            a = a.replace(_group_normalise(a.feats, a.coords[:, 0], mean, var, norm))
            h = self.out_layers[3](self.out_layers[2](a)) + self.skip_connection(fine)
            keep = core.repeat_interleave(8)
            if prune:
                keep &= self.pruning_head(h.feats) >= 0
            coords.append(h.coords[keep])
            feats.append(h.feats[keep] if post is None else post(h.feats[keep]))
        if not coords:  # no voxels at all: the empty result still has the right width
            empty = x.feats.new_zeros(0, self.out_layers[3].out_channels)
            coords, feats = [x.coords[:0]], [empty if post is None else post(empty)]
        coords, feats = torch.cat(coords), torch.cat(feats)
        order = torch.argsort(coords_to_keys(coords))
        return SparseTensor(coords[order], feats[order], x.batch_size)


def chunk_rows(coords: torch.Tensor, side: int, halo: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split voxels ``[N, 4]`` into ``side^3`` spatial chunks grown by ``halo`` voxels.

    Returns, per chunk holding at least one voxel, the rows of its voxels (halo included, increasing) and a mask of
    the rows the chunk owns (every voxel is owned by exactly one chunk).
    """
    if not 0 <= halo < side:
        raise ValueError(f"chunk side {side} must exceed the halo {halo}")
    xyz = coords[:, 1:]
    lo = torch.div(xyz - halo, side, rounding_mode="floor")
    hi = torch.div(xyz + halo, side, rounding_mode="floor")  # lo or lo + 1, since halo < side
    own = coords_to_keys(torch.cat([coords[:, :1], torch.div(xyz, side, rounding_mode="floor")], dim=1))
    rows, keys = [], []
    arange = torch.arange(len(coords), device=coords.device)
    for corner in range(8):  # a voxel lies in the grown chunks lo or hi on each axis
        pick = torch.tensor([(corner >> a) & 1 for a in range(3)], dtype=torch.bool, device=coords.device)
        valid = ~(pick & (hi == lo)).any(dim=1)  # picking hi where hi == lo repeats another corner
        chunk = torch.where(pick, hi, lo)[valid]
        rows.append(arange[valid])
        keys.append(coords_to_keys(torch.cat([coords[valid, :1], chunk], dim=1)))
    rows, keys = torch.cat(rows), torch.cat(keys)
    by_row = torch.argsort(rows, stable=True)
    rows, keys = rows[by_row], keys[by_row]
    by_chunk = torch.argsort(keys, stable=True)  # stable: rows stay increasing within a chunk
    rows, keys = rows[by_chunk], keys[by_chunk]
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    pieces = []
    for key, r in zip(uniq.tolist(), rows.split(counts.tolist())):
        core = own[r] == key
        if bool(core.any()):
            pieces.append((r, core))
    return pieces


def _group_sums(feats: torch.Tensor, batch: torch.Tensor, batch_size: int, groups: int) -> torch.Tensor:
    """``[3, B, G]``: per sample and group, the number of values, their sum and their sum of squares."""
    f = feats.double().reshape(len(feats), groups, -1)
    out = feats.new_zeros(3, batch_size, groups, dtype=torch.float64)
    out[0].index_add_(0, batch, torch.full_like(f[:, :, 0], f.shape[2]))
    out[1].index_add_(0, batch, f.sum(2))
    out[2].index_add_(0, batch, (f * f).sum(2))
    return out


def _mean_var(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = sums[0].clamp(min=1)
    mean = sums[1] / n
    return mean, (sums[2] / n - mean * mean).clamp(min=0)


def _group_normalise(feats, batch, mean, var, norm: SparseGroupNorm) -> torch.Tensor:
    """GroupNorm of ``feats`` with given per-(sample, group) statistics (what :class:`SparseGroupNorm` computes)."""
    n, c = feats.shape
    f = feats.double().reshape(n, norm.num_groups, -1)
    y = (f - mean[batch][:, :, None]) / torch.sqrt(var[batch][:, :, None] + norm.eps)
    return (y.reshape(n, c) * norm.weight.double() + norm.bias.double()).to(feats.dtype)

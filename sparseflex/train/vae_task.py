"""The SparseFlex VAE training loss (SPEC sections 3-4).

Per item: encode the surface points, draw the latent from the posterior with the item's own generator, decode
with the prepared occupancy as teacher (the pruning heads learn it by BCE), build the item's SparseFlex, and render
it against the item's mesh from ``views_per_item`` cameras (outside, zoomed-in, interior), each through a
frustum section of ``visibility_ratio`` of the voxels. Plus KL (1e-6), the FlexiCubes regularisers, the corner
consistency loss, and a truncated corner-SDF term from the item's oriented points that gives a zero-initialised
head its first surface. Every term is a mean over the batch's items, so a batch split over DDP ranks trains as the
whole batch would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.mesh import Mesh
from ..errors import SparseFlexError
from ..fit.sectional import sectional_render_loss
from ..fit.views import ViewSampler
from ..flexicubes.init_sdf import oriented_point_sdf
from ..flexicubes.representation import SparseFlex
from ..sparse.coords import VoxelHash, batched, dilate, downsample
from .config import TrainConfig


def sdf_supervision(sf: SparseFlex, points: torch.Tensor, normals: torch.Tensor, truncation: float) -> torch.Tensor:
    """Mean |s - s_gt| in voxels over the corners, s_gt the oriented-point SDF truncated at +-``truncation`` voxels."""
    base = sf.corners[:, 1:].to(points.dtype) / sf.resolution - 0.5
    with torch.no_grad():
        target = (oriented_point_sdf(base, points, normals) * sf.resolution).clamp(-truncation, truncation)
    return (sf.sdf * sf.resolution - target).abs().mean()


def coarsen(resolution: int, coords: torch.Tensor, occupancy: list[torch.Tensor], factor: int
            ) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """A batch's voxels at ``1/factor`` of its resolution (progressive training): the latent voxels are the parents
    of the active ones, and each occupancy level the parents of the finest level's occupied voxels (a coarse voxel
    holds surface exactly when one of its children does)."""
    if factor == 1:
        return resolution, coords, occupancy
    if resolution % factor:
        raise SparseFlexError(f"latent resolution {resolution} is not divisible by the progressive factor {factor}")
    finest = occupancy[-1]
    levels = [downsample(finest, factor << (len(occupancy) - 1 - k))[0] for k in range(len(occupancy))]
    return resolution // factor, downsample(coords, factor)[0], levels


def _rows(batch_index: torch.Tensor, i: int) -> torch.Tensor:
    return (batch_index == i).nonzero().squeeze(1)


class VAETask:
    """Builds the VAE of ``config.model`` and computes its training loss on :func:`~sparseflex.data.dataset.collate`
    batches (see the module docstring)."""

    def __init__(self, config: TrainConfig):
        self.config = config

    def build_model(self) -> nn.Module:
        from ..models.vae import SparseFlexVAE, get_config
        overrides = {**self.config.model_overrides, "use_checkpoint": self.config.activation_checkpointing}
        return SparseFlexVAE(get_config(self.config.model, **overrides))

    @staticmethod
    def collate(items: list) -> dict:
        from ..data.dataset import collate
        return collate(items)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ..models.vae import kl_divergence
        from ..nn import SparseTensor

        cfg, w = self.config, self.config.loss
        dev = next(model.parameters()).device
        points, normals = batch["points"].to(dev), batch["normals"].to(dev)
        point_batch = batch["point_batch"].to(dev)
        resolution, coords, occupancy = coarsen(batch["resolution"], batch["coords"].to(dev),
                                                [o.to(dev) for o in batch["occupancy"]],
                                                cfg.downsample_at(int(batch.get("step", 0))))
        if w.occupancy_dilation:
            occupancy = [dilate(o, w.occupancy_dilation, resolution << (k + 1)) for k, o in enumerate(occupancy)]
        gens = [torch.Generator().manual_seed(int(s)) for s in batch["seeds"]]

        mean, logvar = model.encode(points, normals, point_batch, coords, resolution=resolution)
        eps = torch.empty_like(mean.feats)
        for i, g in enumerate(gens):  # each item's noise from its own generator: independent of the batch split
            rows = mean.layout[i]
            eps[rows] = torch.randn(eps[rows].shape, generator=g).to(eps)
        z = mean.replace(mean.feats + torch.exp(0.5 * logvar.feats) * eps)
        decoding = model.decode(z, occupancy, resolution=resolution)

        # pruning targets of the whole batch, one voxel hash per level (not one per item and level)
        targets = [VoxelHash(batched(occ)).lookup(p.coords) >= 0 for p, occ in zip(decoding.prune, occupancy)
                   ] if w.prune else []
        items: list[dict[str, torch.Tensor]] = []
        with torch.autocast(dev.type, enabled=False):  # geometry and rendering always in float32
            for i, g in enumerate(gens):
                parts: dict[str, torch.Tensor] = {}
                rows = mean.layout[i]
                parts["kl"] = w.kl * kl_divergence(SparseTensor(mean.coords[rows], mean.feats[rows].float()),
                                                   SparseTensor(mean.coords[rows], logvar.feats[rows].float()))
                if w.prune:
                    bce = []
                    for level, p in enumerate(decoding.prune):
                        r = _rows(p.coords[:, 0], i)
                        if len(r):  # what models.vae.occupancy_bce computes, on the item's rows
                            logits = p.logits[r].float()
                            bce.append(F.binary_cross_entropy_with_logits(logits, targets[level][r].to(logits.dtype)))
                    if bce:
                        parts["prune"] = w.prune * torch.stack(bce).mean()
                sf = _float32(decoding.sparseflex(i))
                pts_i = _rows(point_batch, i)
                item_points, item_normals = points[pts_i].float(), normals[pts_i].float()
                if w.consistency and sf.consistency is not None:
                    parts["consistency"] = w.consistency * sf.consistency
                if w.sdf and sf.num_voxels:
                    parts["sdf"] = w.sdf * sdf_supervision(sf, item_points, item_normals, w.sdf_truncation)
                if sf.num_voxels:
                    self._render_parts(sf, batch["meshes"][i].to(dev), item_points, item_normals, g, parts)
                items.append(parts)

        zero = mean.feats.sum() * 0  # an item without some term (no surface yet) counts it as 0
        parts = {k: torch.stack([p.get(k, zero) for p in items]).mean() for k in self.part_names()}
        total = sum(parts.values()) if parts else zero
        return total, parts

    def part_names(self) -> list[str]:
        """The loss terms, the same on every call and every rank (DDP averages them in one tensor)."""
        w = self.config.loss
        render_terms = [k for k in ("mask", "depth", "normal", "ssim", "lpips") if getattr(w.render, k)]
        optional = [k for k in ("prune", "consistency", "sdf") if getattr(w, k)]
        return sorted(render_terms + ["dev", "sign", "l1", "kl"] + optional)

    def _render_parts(self, sf: SparseFlex, gt: Mesh, points: torch.Tensor, normals: torch.Tensor,
                      generator: torch.Generator, parts: dict) -> None:
        """Add the mean over ``views_per_item`` sectioned views of the rendering loss and regularisers."""
        cfg, w = self.config, self.config.loss
        sampler = ViewSampler(points, normals, cfg.image_size, cfg.views, generator, resolution=sf.resolution)
        views = []
        for _ in range(cfg.views_per_item):
            _, cam = sampler.sample()
            offset = float(torch.rand((), generator=generator))
            views.append(sectional_render_loss(sf, gt, cam, cfg.visibility_ratio, offset, w.render, w.dev,
                                               w.sign, w.weight_l1, cfg.backend)[1])
        for k in sorted({k for v in views for k in v}):
            vals = [v[k] for v in views if k in v]
            parts[k] = torch.stack(vals).sum() / len(views)


def _float32(sf: SparseFlex) -> SparseFlex:
    from dataclasses import replace
    cast = {k: v.float() for k, v in sf.parameters_dict().items()}
    if sf.consistency is not None:
        cast["consistency"] = sf.consistency.float()
    return replace(sf, **cast)

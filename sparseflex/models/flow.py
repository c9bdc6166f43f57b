"""Rectified flow (SPEC section 4, image-to-3D): the noising path, the velocity target and the training loss.

The path from data ``x0`` (t = 0) to Gaussian noise ``eps`` (t = 1) is a straight line, with the small floor
``sigma_min`` on the noise scale that TRELLIS uses::

    x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps
    v   = d x_t / dt = (1 - sigma_min) eps - x0          (the regression target)

Training draws ``t`` from a logit-normal distribution (``sigmoid(N(1, 1))``, which spends most samples on the noisy
half where the velocity is hardest to predict), drops the condition 10 % of the time so the same network also learns
the unconditional velocity for classifier-free guidance, and regresses the velocity with an MSE. Sampling integrates
``dx/dt = v`` from t = 1 back to 0 (:mod:`sparseflex.pipelines.samplers`).

Everything here works on dense latents ``[B, ...]`` and on sparse latents (:class:`~sparseflex.nn.SparseTensor`, one
item per batch index, any number of rows each): per-item values are broadcast to the data's layout by one helper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from ..errors import InputError, check_range
from ..nn.sparse_tensor import SparseTensor

Latent = Union[torch.Tensor, SparseTensor]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]

#: Networks see the time scaled by this factor (TRELLIS' convention: the timestep embedding was designed for
#: diffusion's integer steps 0..1000).
TIME_SCALE = 1000.0


def batch_size(x: Latent) -> int:
    """Number of items of a dense ``[B, ...]`` tensor or of a SparseTensor."""
    return x.batch_size if isinstance(x, SparseTensor) else x.shape[0]


def per_item(values: torch.Tensor, like: Latent) -> torch.Tensor:
    """Per-item ``values [B]`` laid out to broadcast against ``like``'s features: ``[B, 1, ...]`` for a dense
    tensor, ``[N, 1]`` (one row per voxel, through the batch column) for a SparseTensor."""
    if isinstance(like, SparseTensor):
        return like.per_sample(values.to(like.device))[:, None]
    return values.to(like.device).view(-1, *[1] * (like.dim() - 1))


def _feats(x: Latent) -> torch.Tensor:
    return x.feats if isinstance(x, SparseTensor) else x


def _like(x: Latent, feats: torch.Tensor) -> Latent:
    return x.replace(feats) if isinstance(x, SparseTensor) else feats


def item_mean(x: Latent) -> torch.Tensor:
    """``[B]`` mean of each item's values (every channel of every row / cell)."""
    if isinstance(x, SparseTensor):
        f = x.feats.flatten(1)
        sums = f.new_zeros(x.batch_size).index_add_(0, x.batch_index, f.sum(1))
        counts = torch.bincount(x.batch_index, minlength=x.batch_size).to(f.dtype) * f.shape[1]
        return sums / counts.clamp(min=1)
    return x.flatten(1).mean(1)


def _generators(generator: Generators, n: int) -> list:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n
    gens = list(generator)
    if len(gens) != n:
        raise InputError(f"got {len(gens)} generators for a batch of {n} items (one per item, or a single one)")
    return gens


def _item_shapes(x: Latent) -> list[tuple]:
    if isinstance(x, SparseTensor):
        c = tuple(x.feats.shape[1:])
        return [(s.stop - s.start, *c) for s in x.layout]
    return [tuple(x.shape[1:])] * x.shape[0]


@dataclass
class FlowLoss:
    """Result of :meth:`RectifiedFlow.loss`: ``loss`` (scalar, mean over items), ``per_item [B]`` MSE of each item,
    the drawn ``t [B]`` (in [0, 1]) and ``dropped [B]`` (bool: the item saw the unconditional input)."""
    loss: torch.Tensor
    per_item: torch.Tensor
    t: torch.Tensor
    dropped: torch.Tensor

    def by_t_bin(self, bins: int = 10) -> dict[int, float]:
        """Mean per-item MSE in each of ``bins`` equal bins of t (bins without items are left out), for logging
        where along the path the model is still wrong."""
        idx = (self.t.detach().cpu() * bins).long().clamp(max=bins - 1)
        err = self.per_item.detach().float().cpu()
        return {int(b): float(err[idx == b].mean()) for b in idx.unique()}


@dataclass
class RectifiedFlow:
    """The rectified-flow path with TRELLIS' noise floor and the logit-normal time distribution (SPEC section 4).

    ``sigma_min`` keeps a little noise at t = 0; ``t_mean``, ``t_std`` parametrise ``t = sigmoid(N(t_mean, t_std))``.
    """
    sigma_min: float = 1e-5
    t_mean: float = 1.0
    t_std: float = 1.0

    def __post_init__(self):
        check_range("sigma_min", self.sigma_min, 0.0, 1.0, high_open=True)
        check_range("t_mean", self.t_mean)
        check_range("t_std", self.t_std, 0.0)

    def interpolate(self, x0: Latent, eps: Latent, t: torch.Tensor) -> Latent:
        """``x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps`` with per-item ``t [B]``."""
        tb = per_item(t, x0).to(_feats(x0).dtype)
        return _like(x0, (1 - tb) * _feats(x0) + (self.sigma_min + (1 - self.sigma_min) * tb) * _feats(eps))

    def velocity_target(self, x0: Latent, eps: Latent) -> Latent:
        """``v = (1 - sigma_min) eps - x0``, the time derivative of :meth:`interpolate` (constant along a path)."""
        return _like(x0, (1 - self.sigma_min) * _feats(eps) - _feats(x0))

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n]`` float32 times from the logit-normal distribution ``sigmoid(N(t_mean, t_std))`` (on the
        generator's device, the CPU by default)."""
        device = generator.device if generator is not None else "cpu"
        z = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.t_mean + self.t_std * z)

    def draw(self, x0: Latent, generator: Generators = None, cond_drop: float = 0.0):
        """The random part of one training step, item by item: ``(eps, t [B], dropped [B])``.

        Each item draws, from its own generator, first its t, then its dropout coin, then its noise, so an item's
        numbers depend only on its generator, never on the rest of the batch (a batch split over DDP ranks draws the
        same numbers). ``generator`` is a list with one generator per item (the task's ``batch["seeds"]``), or one
        generator used by every item in turn, or None (torch's global generator). Draws happen on each generator's
        device (the CPU for ``torch.Generator()``) and are then moved to the data.
        """
        check_range("cond_drop", cond_drop, 0.0, 1.0)
        gens = _generators(generator, batch_size(x0))
        feats = _feats(x0)
        ts, coins, noise = [], [], []
        for g, shape in zip(gens, _item_shapes(x0)):
            device = g.device if g is not None else "cpu"
            ts.append(self.sample_t(1, g))
            coins.append(torch.rand(1, generator=g, device=device))
            noise.append(torch.randn(shape, generator=g, device=device))
        t = torch.cat(ts).to(feats.device) if ts else feats.new_zeros(0)
        dropped = (torch.cat(coins) < cond_drop).to(feats.device) if coins else t.bool()
        if isinstance(x0, SparseTensor):
            eps = torch.cat(noise) if noise else feats.new_zeros(feats.shape)
        else:
            eps = torch.stack(noise) if noise else feats.new_zeros(feats.shape)
        return _like(x0, eps.to(feats)), t, dropped

    def loss(self, model_fn: Callable, x0: Latent, cond: torch.Tensor | None = None, generator: Generators = None,
             cond_drop: float = 0.1, uncond: torch.Tensor | None = None) -> FlowLoss:
        """One rectified-flow training loss (flow matching with the velocity as target).

        Draws eps, t and the dropout coin per item (:meth:`draw`), replaces the condition of dropped items by
        ``uncond`` (default: zeros shaped like ``cond``, TRELLIS' unconditional input; any tensor broadcastable to
        ``cond``), calls ``model_fn(x_t, 1000 * t, cond)`` and returns the MSE to the velocity target: per item (the
        mean over its cells or rows) and their mean over items. For sparse latents every item counts the same
        however many voxels it has (TRELLIS averages over all voxels of the batch instead), which also makes the loss
        of a batch the mean of the losses of its parts. ``cond`` None means an unconditional model (nothing is
        dropped; the model gets None).
        """
        eps, t, dropped = self.draw(x0, generator, cond_drop if cond is not None else 0.0)
        if cond is not None:
            if len(cond) != len(t):
                raise InputError(f"condition has {len(cond)} items but the latent has {len(t)}")
            null = torch.zeros_like(cond) if uncond is None else uncond.to(cond)
            cond = torch.where(dropped.view(-1, *[1] * (cond.dim() - 1)), null, cond)
        x_t = self.interpolate(x0, eps, t)
        target = self.velocity_target(x0, eps)
        pred = model_fn(x_t, TIME_SCALE * t, cond)
        err = _feats(pred).float() - _feats(target).float()
        per = item_mean(_like(x0, err.square()))
        return FlowLoss(per.mean(), per, t, dropped)

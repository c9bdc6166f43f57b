"""Rendering losses (SPEC section 3): L_render = L1(depth) + L1(normal) + L1(mask) + SSIM(normal) + LPIPS(normal).

Default weights follow TRELLIS / FlexiCubes: mask 1, depth 10 (L1 over the ground-truth mask only), normal L1 1
plus 0.2 * (1 - SSIM). LPIPS needs a pretrained network that cannot be downloaded here: pass your own callable
(e.g. an ``lpips.LPIPS`` module loaded from local weights) to use it; it is never approximated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import OptionError


@dataclass
class RenderLossWeights:
    mask: float = 1.0
    depth: float = 10.0
    normal: float = 1.0
    ssim: float = 0.2
    lpips: float = 0.0


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity of images ``[B, C, H, W]`` (Wang et al. 2004): Gaussian-weighted local statistics
    over the windows that fit inside the image, K1 = 0.01, K2 = 0.03."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two [B, C, H, W] images of one shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise OptionError(f"images of {x.shape[-2]}x{x.shape[-1]} are smaller than the {window}-pixel SSIM window")
    c = x.shape[1]
    g = gaussian_window(window, sigma, x.dtype, x.device)
    gx, gy = g.view(1, 1, 1, -1).expand(c, 1, 1, window), g.view(1, 1, -1, 1).expand(c, 1, window, 1)
    blur = lambda img: F.conv2d(F.conv2d(img, gx, groups=c), gy, groups=c)  # noqa: E731 separable, 'valid'
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s.mean()


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the pixels where ``mask`` > 0 (0 when the mask is empty)."""
    m = (mask > 0).to(pred.dtype)
    return ((pred - target).abs() * m).sum() / m.sum().clamp(min=1)


def render_loss(pred: dict, target: dict, weights: RenderLossWeights | None = None,
                lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted rendering loss between two :func:`~sparseflex.render.render` outputs (``mask`` [B, H, W],
    ``depth`` [B, H, W], ``normal`` [B, H, W, 3]); returns the total and its weighted parts.

    ``lpips`` is a callable on ``[B, 3, H, W]`` images in [-1, 1] returning a per-image or scalar distance; it is
    required when ``weights.lpips > 0``.
    """
    w = weights or RenderLossWeights()
    if w.lpips > 0 and lpips is None:
        raise OptionError("LPIPS weight > 0 needs a perceptual network: pass lpips=<callable> (its weights cannot "
                          "be downloaded here)")
    parts: dict[str, torch.Tensor] = {}
    if w.mask:
        parts["mask"] = w.mask * (pred["mask"] - target["mask"]).abs().mean()
    if w.depth:
        parts["depth"] = w.depth * masked_l1(pred["depth"], target["depth"], target["mask"])
    if w.normal:
        parts["normal"] = w.normal * (pred["normal"] - target["normal"]).abs().mean()
    if w.ssim or w.lpips:
        n_pred, n_gt = pred["normal"].permute(0, 3, 1, 2), target["normal"].permute(0, 3, 1, 2)
        if w.ssim:
            parts["ssim"] = w.ssim * (1 - ssim(n_pred, n_gt, data_range=2.0))  # normals span [-1, 1]
        if w.lpips:
            parts["lpips"] = w.lpips * lpips(n_pred, n_gt).mean()
    total = sum(parts.values()) if parts else pred["mask"].new_zeros(())
    return total, parts

"""FlexiCubes regularisers (the paper's L_flex family, SPEC section 2.8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdf_sign_loss(corner_sdf: torch.Tensor, crossing_edges: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy on each crossing edge pushing each end towards the other end's sign.

    Every sign change costs something, so spurious crossings (floaters, inner sheets that no view supports) are
    removed unless the rendering losses keep them. ``scale`` multiplies the SDF before it is used as a logit (pass R
    so that values of about one voxel give logits of about one).
    """
    if len(crossing_edges) == 0:
        return corner_sdf.new_zeros(())
    s = corner_sdf[crossing_edges] * scale  # [E, 2]
    return (F.binary_cross_entropy_with_logits(s[:, 0], (s[:, 1] > 0).to(s.dtype))
            + F.binary_cross_entropy_with_logits(s[:, 1], (s[:, 0] > 0).to(s.dtype)))


def weight_l1(*raw_weights: torch.Tensor) -> torch.Tensor:
    """Mean absolute value of the raw (pre-activation) FlexiCubes weights: keeps them near their neutral value.

    With no weight at all (a view that sees no voxel) it is 0 on the weights' device and in their dtype: a CPU
    zero stacked with the other views' CUDA values crashed VAE training."""
    terms = [w.abs().mean() for w in raw_weights if w.numel()]
    if terms:
        return torch.stack(terms).sum()
    return raw_weights[0].new_zeros(()) if raw_weights else torch.zeros(())

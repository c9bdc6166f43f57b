"""One view of frustum-aware sectional training (SPEC section 3): the step per-shape fitting and VAE training share."""

from __future__ import annotations

import time

import torch

from ..data.mesh import Mesh
from ..flexicubes.regularizers import sdf_sign_loss, weight_l1
from ..flexicubes.representation import SparseFlex
from ..losses import RenderLossWeights, render_loss
from ..render.camera import Camera
from ..render.frustum import section
from ..render.maps import render


def sectional_render_loss(sf: SparseFlex, gt: Mesh, camera: Camera, ratio: float, offset: float,
                          weights: RenderLossWeights, dev: float, sign: float, l1: float, backend: str = "auto",
                          timing: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rendering loss of one view through a frustum section, plus the FlexiCubes regularisers of the section's voxels.

    ``camera`` (one view) gets near/far planes making ``ratio`` of the voxels active (``offset`` in [0, 1] chooses
    which depth slice); only those voxels (and those within half a voxel of the planes) are extracted and rendered,
    and the ground truth is rendered with the same clipped camera. Returns the total and its weighted parts (render
    terms, ``dev``, ``sign``, ``l1``). ``timing`` accumulates seconds under ``other`` (sectioning), ``extract`` and
    ``render``.
    """
    t0 = time.perf_counter()
    centres = sf.voxel_centers().detach()
    # voxels within half a voxel diagonal outside the planes can hold surface the ground truth shows inside them
    cam, active = section(centres, camera, ratio, offset=offset, margin=3 ** 0.5 / (2 * sf.resolution))
    sub = sf.select(active[0])
    t1 = time.perf_counter()
    ex = sub.extract(training=True)
    t2 = time.perf_counter()
    pred = render(ex.vertices, ex.faces, cam, backend=backend, allow_empty=True)
    with torch.no_grad():
        target = render(gt.vertices, gt.faces, cam, backend=backend, antialias_edges=True)
    _, parts = render_loss(pred, target, weights)
    if len(ex.faces):
        parts["dev"] = dev * ex.dev_loss
    parts["sign"] = sign * sdf_sign_loss(sub.sdf, ex.crossing_edges, scale=sf.resolution)
    parts["l1"] = l1 * weight_l1(sub.alpha_raw, sub.beta_raw, sub.gamma_raw)
    if timing is not None:
        for key, seconds in (("other", t1 - t0), ("extract", t2 - t1), ("render", time.perf_counter() - t2)):
            timing[key] = timing.get(key, 0.0) + seconds
    return sum(parts.values()), parts

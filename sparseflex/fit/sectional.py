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


def seen_voxels(centres: torch.Tensor, camera: Camera, *maps: dict, tolerance: float) -> torch.Tensor:
    """``[N]`` bool: voxel centres inside the (single) view's image and not behind the farther of the first surfaces
    the rendered ``maps`` show at their pixel (by more than ``tolerance``); background pixels hide nothing."""
    uv, z = camera.to_pixels(centres)
    uv, z = torch.round(uv[0]).long(), z[0]
    u, v = uv[:, 0], uv[:, 1]
    inside = (z > 0) & (u >= 0) & (u < camera.width) & (v >= 0) & (v < camera.height)
    pix = (v.clamp(0, camera.height - 1) * camera.width + u.clamp(0, camera.width - 1))
    front = torch.full((camera.height * camera.width,), -float("inf"), dtype=z.dtype, device=z.device)
    for m in maps:
        hit = m["tri_id"][0].reshape(-1) >= 0
        depth = m["depth"][0].detach().reshape(-1).to(z.dtype)
        front = torch.maximum(front, torch.where(hit, depth, torch.full_like(depth, float("inf"))))
    return inside & (z <= front[pix] + tolerance)


def sectional_render_loss(sf: SparseFlex, gt: Mesh, camera: Camera, ratio: float, offset: float,
                          weights: RenderLossWeights, dev: float, sign: float, l1: float, backend: str = "auto",
                          timing: dict[str, float] | None = None,
                          select=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
    sub = (select or sf.select)(active[0])
    t1 = time.perf_counter()
    ex = sub.extract(training=True)
    t2 = time.perf_counter()
    pred = render(ex.vertices, ex.faces, cam, backend=backend, allow_empty=True)
    with torch.no_grad():
        target = render(gt.vertices, gt.faces, cam, backend=backend, antialias_edges=True)
    _, parts = render_loss(pred, target, weights)
    # The regularisers act only where this view supervises: on hidden voxels nothing would oppose them, and Adam
    # moves a parameter at its full rate whatever a loss's weight, so they would slowly erase inner surfaces (the
    # parts of an armchair inside one another) and bend hidden junctions.
    seen = seen_voxels(centres[active[0]], cam, pred, target, tolerance=3 ** 0.5 / sf.resolution)
    if len(ex.faces):
        dev_seen = ex.dev[seen[ex.dual_voxel]]
        if len(dev_seen):
            parts["dev"] = dev * dev_seen.mean()
    corner_seen = torch.zeros(len(sub.sdf), dtype=torch.bool, device=seen.device)
    corner_seen[sub.voxel_corners[seen].reshape(-1)] = True
    edges = ex.crossing_edges[corner_seen[ex.crossing_edges].all(1)]
    parts["sign"] = sign * sdf_sign_loss(sub.sdf, edges, scale=sf.resolution)
    parts["l1"] = l1 * weight_l1(sub.alpha_raw[seen], sub.beta_raw[seen], sub.gamma_raw[seen])
    if timing is not None:
        for key, seconds in (("other", t1 - t0), ("extract", t2 - t1), ("render", time.perf_counter() - t2)):
            timing[key] = timing.get(key, 0.0) + seconds
    return sum(parts.values()), parts

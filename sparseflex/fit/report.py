"""Pictures of a fit: ground-truth vs fitted normal maps from a few views (interior included), and loss curves."""

from __future__ import annotations

import os

import torch

from ..data.mesh import Mesh
from ..io import atomic_path
from ..render.camera import cat_cameras, interior_views, sphere_views
from ..render.images import image_grid, normal_to_rgb, save_png
from ..render.maps import render


def comparison_views(gt: Mesh, size: int = 256, outside: int = 4, interior: int = 2, seed: int = 0):
    """Fixed cameras for comparisons: evenly spread outside views plus interior views inside the ground truth."""
    from ..data.sampling import sample_surface
    gen = torch.Generator().manual_seed(seed)
    cams = [sphere_views(outside, radius=1.8, size=size)]
    if interior:
        pts, nrm, _ = sample_surface(gt, 10_000, generator=gen)
        cams.append(interior_views(pts, interior, gen, normals=nrm, size=size))
    return cat_cameras([c.to(gt.vertices.device) for c in cams])


def comparison_image(gt: Mesh, meshes: dict[str, Mesh], path: str | os.PathLike, size: int = 256,
                     interior: int = 2, backend: str = "auto"):
    """Save a grid: one row per mesh (ground truth first), one column per view; returns the path."""
    cams = comparison_views(gt, size, interior=interior)
    rows, labels = [], []
    for name, mesh in [("ground truth", gt), *meshes.items()]:
        with torch.no_grad():
            maps = render(mesh.vertices, mesh.faces, cams, backend=backend, allow_empty=True)
        rows.append([normal_to_rgb(maps["normal"][b], maps["mask"][b]) for b in range(len(cams))])
        labels.append(name)
    cols = [f"outside {i}" for i in range(len(cams) - interior)] + [f"interior {i}" for i in range(interior)]
    return save_png(image_grid(rows, labels, cols), path)


def loss_curve(history: list, path: str | os.PathLike, title: str = "fit loss"):
    """Plot total loss (and its parts) per step, with stage boundaries; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if history:
        ax.plot(steps, [h[3] for h in history], lw=0.6, alpha=0.35, color="k")
        smooth = torch.tensor([h[3] for h in history]).unfold(0, min(25, len(history)), 1).mean(1)
        ax.plot(steps[len(steps) - len(smooth):], smooth.tolist(), lw=1.5, color="k", label="total")
        for key in history[0][4]:
            vals = torch.tensor([h[4].get(key, float("nan")) for h in history])
            if len(vals) >= 25:
                vals = vals.unfold(0, 25, 1).nanmean(1)
            ax.plot(steps[len(steps) - len(vals):], vals.tolist(), lw=1, label=key)
        res = [h[1] for h in history]
        for i in range(1, len(res)):
            if res[i] != res[i - 1]:
                ax.axvline(steps[i], color="grey", ls="--", lw=0.8)
                ax.text(steps[i], ax.get_ylim()[1], f" {res[i]}^3", va="top", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path

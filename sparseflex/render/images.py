"""Turning rendered maps into pictures people look at: normal and depth colouring, labelled grids, PNG output."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..io import atomic_path


def normal_to_rgb(normal: torch.Tensor, mask: torch.Tensor | None = None, background: float = 1.0) -> np.ndarray:
    """``[H, W, 3]`` normals in [-1, 1] -> uint8 RGB ((n + 1) / 2), background white where ``mask`` is 0."""
    rgb = (normal.detach().float().cpu().clamp(-1, 1) + 1) / 2
    if mask is not None:
        m = mask.detach().float().cpu()[..., None].clamp(0, 1)
        rgb = rgb * m + background * (1 - m)
    return (rgb.numpy() * 255 + 0.5).astype(np.uint8)


def depth_to_rgb(depth: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``[H, W]`` depth -> uint8 grey image (near bright), normalised over the masked pixels; background black."""
    d = depth.detach().float().cpu()
    m = mask.detach().cpu() > 0.5
    out = torch.zeros_like(d)
    if m.any():
        lo, hi = d[m].min(), d[m].max()
        out[m] = 1 - (d[m] - lo) / (hi - lo).clamp(min=1e-8) * 0.8
    return (out[..., None].expand(*out.shape, 3).numpy() * 255 + 0.5).astype(np.uint8)


def image_grid(rows: list[list[np.ndarray]], row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, pad: int = 4) -> Image.Image:
    """Tile equally sized RGB arrays into one labelled image."""
    h, w = rows[0][0].shape[:2]
    font = ImageDraw.Draw(Image.new("RGB", (1, 1))).getfont()
    label_w = max(90, 12 + max(int(font.getlength(t)) for t in row_labels)) if row_labels else 0
    label_h = 16 if col_labels else 0
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (label_w + ncol * (w + pad) + pad, label_h + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        y = label_h + pad + i * (h + pad)
        if row_labels:
            draw.text((4, y + h // 2 - 6), row_labels[i], fill="black")
        for j, img in enumerate(row):
            canvas.paste(Image.fromarray(img), (label_w + pad + j * (w + pad), y))
    if col_labels:
        for j, text in enumerate(col_labels):
            draw.text((label_w + pad + j * (w + pad) + 2, 2), text, fill="black")
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save atomically (temporary file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp)
    return path


def input_and_views(image: torch.Tensor | None, meshes: dict, path: str | os.PathLike, views: int = 4,
                    size: int = 256) -> Path:
    """Save a grid, one row per mesh (name -> :class:`~sparseflex.data.mesh.Mesh` in the unit cube): the input
    image (``[3, H, W]`` in [0, 1], or None) then normal renders from ``views`` evenly spread outside views."""
    from .camera import sphere_views
    from .maps import render
    cams = sphere_views(views, radius=1.8, size=size)
    first = []
    if image is not None:
        pic = Image.fromarray((image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5)
                              .astype(np.uint8)).resize((size, size), Image.LANCZOS)
        first = [np.asarray(pic)]
    rows = []
    for mesh in meshes.values():
        with torch.no_grad():
            maps = render(mesh.vertices.float().cpu(), mesh.faces.cpu(), cams, allow_empty=True)
        rows.append(first + [normal_to_rgb(maps["normal"][b], maps["mask"][b]) for b in range(views)])
    cols = (["input"] if image is not None else []) + [f"view {i}" for i in range(views)]
    return save_png(image_grid(rows, list(meshes), cols), path)

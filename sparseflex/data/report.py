"""Pictures of a prepared dataset: a contact sheet of its items."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..render.camera import sphere_views
from ..render.images import image_grid, normal_to_rgb, save_png
from ..render.maps import render


def thumbnail(item_path: str | os.PathLike, size: int = 128) -> np.ndarray:
    """uint8 ``[size, size, 3]`` picture of a prepared item: its first conditioning render over white, or a normal
    map from a fixed view when it has none."""
    with np.load(item_path) as z:
        if "images" in z.files and len(z["images"]):
            rgba = z["images"][0].astype(np.float32) / 255
            rgb = rgba[..., :3] + (1 - rgba[..., 3:])  # premultiplied colour over white
            image = (rgb.clip(0, 1) * 255 + 0.5).astype(np.uint8)
        else:
            vertices, faces = torch.from_numpy(z["vertices"]), torch.from_numpy(z["faces"].astype(np.int64))
            maps = render(vertices, faces, sphere_views(1, size=size), antialias_edges=False)
            image = normal_to_rgb(maps["normal"][0], maps["mask"][0])
    return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))


def contact_sheet(root: str | os.PathLike, records: list[dict], path: str | os.PathLike, max_items: int = 64,
                  per_row: int = 8, size: int = 128) -> Path:
    """Write a PNG grid of the first ``max_items`` items of ``records`` (rows labelled by item number)."""
    records = records[:max_items]
    thumbs = [thumbnail(Path(root) / r["file"], size) for r in records]
    rows = [thumbs[i:i + per_row] for i in range(0, len(thumbs), per_row)]
    labels = [f"#{i}-{min(i + per_row, len(thumbs)) - 1}" for i in range(0, len(thumbs), per_row)]
    return save_png(image_grid(rows, row_labels=labels), path)

"""Training data from a prepared directory (``sparseflex data prepare``): a map-style dataset and its collate.

Items vary in size (points, voxels, mesh), so :func:`collate` concatenates them and adds the item index as a batch
column, the layout the sparse modules use. Works with ``torch.utils.data.DataLoader(collate_fn=collate)`` and with
``DistributedSampler`` (the dataset is a plain indexable list of files).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError, OptionError
from . import manifest
from .item import item_mesh, load_item

SPLITS = ("train", "val", "all")


class PreparedDataset(torch.utils.data.Dataset):
    """The prepared items of ``root`` in one split (``"train"``, ``"val"`` or ``"all"``), in manifest order.

    ``ds[i]`` is a dict: ``name``; ``points`` float32 [P, 3] and ``normals`` float32 [P, 3] in the normalised
    frame; ``coords`` int64 [N, 3] active voxels at ``resolution``; ``occupancy`` list of int64 [M_l, 3] at each
    resolution of ``levels``; ``vertices`` float32 [V, 3] and ``faces`` int64 [F, 3] (the normalised mesh); with
    ``with_images`` also ``images`` uint8 [V, S, S, 4] (RGBA) and ``cameras`` (a
    :class:`~sparseflex.render.camera.Camera` batch).

    A manifest line naming a file outside ``root`` (an absolute path, ``..``) raises
    :class:`~sparseflex.errors.InputError` when the dataset is opened.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", with_images: bool = False):
        if split not in SPLITS:
            raise OptionError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        self.root = Path(root)
        if not (self.root / manifest.MANIFEST).exists():
            raise InputError(f"{self.root}: no {manifest.MANIFEST} (run `sparseflex data prepare` first)")
        self.records = [r for r in manifest.read_manifest(self.root) if split == "all" or r["split"] == split]
        self.with_images = with_images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {"name": record["name"], **load_item(manifest.item_path(self.root, record), self.with_images)}


def collate(items: list[dict]) -> dict:
    """One batch from dataset items: ``points``/``normals`` [sumP, 3] with ``point_batch`` [sumP]; ``coords``
    [sumN, 4] and ``occupancy`` (per level [sumM, 4]) with the item index first; ``meshes`` (list of
    :class:`~sparseflex.data.mesh.Mesh`), ``names``, ``resolution`` and ``levels``; with images also ``images``
    (list of uint8 [V, S, S, 4]) and ``cameras`` (list of Camera)."""
    if not items:
        raise InputError("cannot collate an empty list of items")
    resolution, levels = items[0]["resolution"], items[0]["levels"]
    if any(it["resolution"] != resolution or it["levels"] != levels for it in items):
        raise InputError("items prepared at different resolutions cannot share a batch")

    def with_batch(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.cat([t.new_full((len(t), 1), i), t], dim=1) for i, t in enumerate(tensors)])

    batch = {"points": torch.cat([it["points"] for it in items]),
             "normals": torch.cat([it["normals"] for it in items]),
             "point_batch": torch.cat([torch.full((len(it["points"]),), i, dtype=torch.long)
                                       for i, it in enumerate(items)]),
             "coords": with_batch([it["coords"] for it in items]),
             "occupancy": [with_batch([it["occupancy"][level] for it in items]) for level in range(len(levels))],
             "meshes": [item_mesh(it) for it in items],
             "names": [it["name"] for it in items],
             "resolution": resolution, "levels": list(levels)}
    if "images" in items[0]:
        batch["images"] = [it["images"] for it in items]
        batch["cameras"] = [it["cameras"] for it in items]
    return batch

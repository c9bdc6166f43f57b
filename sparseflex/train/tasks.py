"""The training tasks by name: what ``config.task`` trains and on which view of a prepared dataset."""

from __future__ import annotations

import os

from ..errors import OptionError
from .config import TASKS, TrainConfig


def build_task(config: TrainConfig, dataset=None):
    """The :class:`~sparseflex.train.trainer.Task` of ``config.task`` (``dataset``: what it trains on, from which a
    SLat flow takes its latent statistics and VAE when the config has none)."""
    if config.task == "vae":
        from .vae_task import VAETask
        return VAETask(config)
    if config.task == "structure-vae":
        from .generation_tasks import StructureVAETask
        return StructureVAETask(config)
    if config.task == "structure-flow":
        from .generation_tasks import StructureFlowTask
        return StructureFlowTask(config)
    if config.task == "slat-flow":
        from .generation_tasks import SLatFlowTask
        return SLatFlowTask(config, dataset)
    raise OptionError(f"unknown training task {config.task!r}; choose one of {', '.join(TASKS)}")


def open_dataset(config: TrainConfig, root: str | os.PathLike, split: str = "train"):
    """What the task reads from ``root``: prepared items (``data prepare``; the structure flow with their conditioning
    renders), or for the SLat flow a latent folder (``data encode``) with the renders of its prepared items."""
    if config.task == "slat-flow":
        from ..data.latents import LatentDataset
        return LatentDataset(root, split=split, with_images=True)
    from ..data.dataset import PreparedDataset
    return PreparedDataset(root, split=split, with_images=config.task == "structure-flow")

"""Training: a generic loop (:class:`Trainer`: AdamW, EMA, DDP, exact resume), its configuration, and the SparseFlex
VAE loss (:class:`VAETask`)."""

from .config import PRESETS, TrainConfig, VAELossConfig, load_config
from .trainer import Trainer
from .vae_task import VAETask, sectional_render_loss

__all__ = ["PRESETS", "TrainConfig", "Trainer", "VAELossConfig", "VAETask", "load_config", "sectional_render_loss"]

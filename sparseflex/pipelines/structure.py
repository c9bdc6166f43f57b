"""Image -> sparse voxel structure, the first stage of image-to-3D (SPEC section 4).

The image encoder turns the image into tokens; the structure flow integrates noise into a structure latent by Euler
steps with classifier-free guidance; the structure VAE decodes it to an occupancy grid whose occupied voxels
(logit > 0) are the active latent voxels the second stage fills in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError, OptionError
from ..models.checkpoint import load_weights, read_checkpoint
from ..models.image_encoder import ImageEncoder, image_tokens, load_image_encoder
from ..models.structure_flow import StructureFlow, StructureFlowConfig
from ..models.structure_vae import StructureVAE, StructureVAEConfig, grid_to_coords
from .samplers import DEFAULT_GUIDANCE, DEFAULT_SHIFT, DEFAULT_STEPS, euler_sample, gaussian_noise, guided_velocity


def load_structure_vae(path: str | os.PathLike, device=None) -> StructureVAE:
    """A trained :class:`StructureVAE` (its EMA weights) in eval mode; other checkpoints are a one-line error."""
    ck = read_checkpoint(path, task="structure-vae")
    if ck.config is None:
        raise InputError(f"{path}: the checkpoint holds no structure VAE config")
    model = StructureVAE(StructureVAEConfig.from_dict(ck.config))
    load_weights(model, ck.state, str(path))
    return model.to(device or "cpu").eval()


def load_structure_flow(path: str | os.PathLike, device=None) -> tuple[StructureFlow, dict]:
    """A trained :class:`StructureFlow` (EMA weights) in eval mode and its run's training config (which names the
    structure VAE and image encoder it was trained with)."""
    ck = read_checkpoint(path, task="structure-flow")
    if ck.config is None:
        raise InputError(f"{path}: the checkpoint holds no structure flow config")
    model = StructureFlow(StructureFlowConfig.from_dict(ck.config))
    load_weights(model, ck.state, str(path))
    return model.to(device or "cpu").eval(), ck.train_config or {}


@dataclass
class StructureResult:
    """A generated structure: occupied voxels ``coords [M, 3]`` at ``resolution``, the latent it decoded from and
    the occupancy ``logits [S, S, S]``."""
    coords: torch.Tensor
    resolution: int
    latent: torch.Tensor
    logits: torch.Tensor


@dataclass
class StructurePipeline:
    """Image encoder + structure flow + structure VAE decoder."""
    flow: StructureFlow
    structure_vae: StructureVAE
    image_encoder: ImageEncoder

    @classmethod
    def from_checkpoint(cls, flow: str | os.PathLike, structure_vae: str | os.PathLike | None = None,
                        image_encoder: str | os.PathLike | None = None, device=None) -> "StructurePipeline":
        """Load a structure flow checkpoint; the structure VAE and image encoder default to those its training run
        used (paths as given to that run)."""
        model, train_config = load_structure_flow(flow, device)
        trained = train_config.get("flow", {}) if isinstance(train_config.get("flow"), dict) else {}
        vae_path = structure_vae or trained.get("structure_vae")
        if not vae_path:
            raise OptionError(f"{flow}: name the structure VAE checkpoint (the run does not record one)")
        vae = load_structure_vae(vae_path, device)
        encoder = load_image_encoder(image_encoder or trained.get("image_encoder") or "tiny", device)
        pipe = cls(model, vae, encoder)
        pipe.check()
        return pipe

    def check(self) -> None:
        """The three parts fit together (channels and widths), else a one-line error."""
        f, v = self.flow.config, self.structure_vae.config
        if f.in_channels != v.latent_channels:
            raise InputError(f"the structure flow generates {f.in_channels}-channel latents but the structure VAE "
                             f"decodes {v.latent_channels} channels")
        if f.cond_channels != self.image_encoder.dim:
            raise InputError(f"the structure flow expects {f.cond_channels}-channel image tokens but the image "
                             f"encoder gives {self.image_encoder.dim}")

    @property
    def resolution(self) -> int:
        """The generated structure's grid size S."""
        return self.flow.config.resolution * self.structure_vae.config.downsample_factor

    @torch.no_grad()
    def __call__(self, images: list, seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                 shift: float = DEFAULT_SHIFT, interval: tuple[float, float] | None = None,
                 callback: Callable | None = None) -> list[StructureResult]:
        """One structure per image (a file or an RGBA / RGB array), reproducible for a given ``seed``."""
        return self.sample(image_tokens(self.image_encoder, list(images)), seed, steps, guidance, shift, interval,
                           callback)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, seed: int = 0, steps: int = DEFAULT_STEPS,
               guidance: float = DEFAULT_GUIDANCE, shift: float = DEFAULT_SHIFT,
               interval: tuple[float, float] | None = None, callback: Callable | None = None
               ) -> list[StructureResult]:
        """One structure per item of the image tokens ``cond [B, T, C]`` (:func:`image_tokens`)."""
        if steps < 1:
            raise OptionError(f"steps must be >= 1; got {steps}")
        if not guidance >= 0:
            raise OptionError(f"guidance must be >= 0; got {guidance}")
        cfg = self.flow.config
        noise = gaussian_noise((len(cond), cfg.in_channels, *[cfg.resolution] * 3), seed, cond.device)
        velocity = guided_velocity(self.flow, cond, torch.zeros_like(cond), guidance, interval)
        latent = euler_sample(velocity, noise, steps, shift, callback)
        logits = self.structure_vae.decode(latent)
        return [StructureResult(grid_to_coords(logits[i:i + 1])[:, 1:], self.resolution, latent[i], logits[i, 0])
                for i in range(len(latent))]

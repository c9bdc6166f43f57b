"""Training tasks of image-to-3D (SPEC section 4): the structure VAE, the structure flow and the SLat flow.

A prepared item's STRUCTURE is the occupancy grid of its active latent voxels at the prepared latent resolution S
(``data prepare --resolution``). The structure VAE learns to compress it to an ``S / 4`` latent grid (soft Dice +
KL, TRELLIS' recipe); the structure flow learns to generate that latent (the frozen structure VAE's posterior mean)
from an image; the structured-latent (SLat) flow learns to generate the SparseFlex VAE's latent on the structure's
voxels (``data encode``), normalised per channel. Both flows are rectified flows conditioned on the image tokens of one
of the item's conditioning renders (the frozen image encoder), with the condition dropped for classifier-free
guidance. Every task computes each term per item from the item's own seed, so a batch split over DDP ranks trains
as the whole batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError, OptionError
from .config import TrainConfig


#: Structure latents the flow task keeps in memory (8 x 16^3 floats, 128 KB each at S = 64).
LATENT_CACHE = 8192


def structure_grids(items: list[dict]) -> tuple[torch.Tensor, int]:
    """The occupancy grids ``[B, 1, S, S, S]`` of prepared items' latent voxels, and S."""
    from ..models.structure_vae import occupancy_grid
    resolution = items[0]["resolution"]
    if any(it["resolution"] != resolution for it in items):
        raise InputError("items prepared at different resolutions cannot share a batch")
    coords = torch.cat([torch.cat([it["coords"].new_full((len(it["coords"]), 1), i), it["coords"]], 1)
                        for i, it in enumerate(items)])
    return occupancy_grid(coords, resolution, len(items)), resolution


def _generators(batch: dict) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in batch["seeds"]]


def render_tokens(encoder, images: list[torch.Tensor], generators: list[torch.Generator]) -> torch.Tensor:
    """Image tokens of one conditioning render per item (``images[i]`` uint8 [V, S, S, 4]), each drawn from the
    item's own generator before anything else it draws (the same numbers on every DDP rank)."""
    from ..models.image_encoder import image_tokens
    views = [item[int(torch.randint(len(item), (1,), generator=g))].numpy() for item, g in zip(images, generators)]
    return image_tokens(encoder, views)


class StructureVAETask:
    """Trains a :class:`~sparseflex.models.structure_vae.StructureVAE` (preset ``config.model``) on the structures
    of prepared items: soft Dice of each item's decoded occupancy + ``structure_loss.kl`` x KL, averaged over items."""

    def __init__(self, config: TrainConfig):
        self.config = config

    def build_model(self) -> nn.Module:
        from ..models.structure_vae import StructureVAE, get_structure_vae_config
        overrides = {**self.config.model_overrides, "use_checkpoint": self.config.activation_checkpointing}
        return StructureVAE(get_structure_vae_config(self.config.model, **overrides))

    @staticmethod
    def collate(items: list) -> dict:
        grid, resolution = structure_grids(items)
        return {"grid": grid, "resolution": resolution, "names": [it["name"] for it in items]}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ..models.structure_vae import structure_vae_loss
        grid = batch["grid"].to(next(model.parameters()).device)
        mean, logvar = model.encode(grid)
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in _generators(batch)]).to(mean)
        logits = model.decode(mean + torch.exp(0.5 * logvar) * eps)
        items = [structure_vae_loss(logits[i:i + 1], grid[i:i + 1], mean[i:i + 1], logvar[i:i + 1],
                                    self.config.structure_loss.kl) for i in range(len(grid))]
        parts = {k: torch.stack([p[k] for _, p in items]).mean() for k in items[0][1]}
        return torch.stack([total for total, _ in items]).mean(), parts


class StructureFlowTask:
    """Trains a :class:`~sparseflex.models.structure_flow.StructureFlow` (preset ``config.model``): rectified flow
    from noise to the structure latents of the frozen structure VAE ``config.flow.structure_vae``, conditioned on the
    frozen image encoder ``config.flow.image_encoder``'s tokens of one random conditioning render per item."""

    def __init__(self, config: TrainConfig):
        from ..models.flow import RectifiedFlow
        from ..models.image_encoder import load_image_encoder
        from ..pipelines.structure import load_structure_vae
        self.config = config
        f = config.flow
        if not f.structure_vae:
            raise OptionError("the structure flow trains on a structure VAE's latents: give its checkpoint with "
                              "--set flow.structure_vae=RUN/checkpoint.pt (train it with `sparseflex train "
                              "structure-vae`)")
        self.flow = RectifiedFlow(f.sigma_min, f.t_mean, f.t_std)
        self.structure_vae = load_structure_vae(f.structure_vae).requires_grad_(False)
        self.image_encoder = load_image_encoder(f.image_encoder).requires_grad_(False)
        self.latents: dict[str, torch.Tensor] = {}  # item name -> its structure latent (the frozen VAE's mean)

    def build_model(self) -> nn.Module:
        from ..models.structure_flow import StructureFlow, get_structure_flow_config
        overrides = {**self.config.model_overrides, "use_checkpoint": self.config.activation_checkpointing}
        config = get_structure_flow_config(self.config.model, **overrides)
        vae = self.structure_vae.config
        if config.in_channels != vae.latent_channels or config.out_channels != vae.latent_channels:
            raise OptionError(f"the structure flow works on {config.in_channels} channels but the structure VAE's "
                              f"latent has {vae.latent_channels}")
        if config.cond_channels != self.image_encoder.dim:
            raise OptionError(f"the structure flow expects {config.cond_channels}-channel image tokens but the image "
                              f"encoder {self.config.flow.image_encoder!r} gives {self.image_encoder.dim}; set "
                              f"model_overrides.cond_channels")
        return StructureFlow(config)

    @staticmethod
    def collate(items: list) -> dict:
        grid, resolution = structure_grids(items)
        return {"grid": grid, "resolution": resolution, "names": [it["name"] for it in items],
                "images": [it["images"] for it in items]}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dev = next(model.parameters()).device
        self.structure_vae.to(dev).eval()
        self.image_encoder.to(dev).eval()
        gens = _generators(batch)
        grid = batch["grid"].to(dev)
        expected = model.config.resolution * self.structure_vae.config.downsample_factor
        if grid.shape[-1] != expected:
            raise OptionError(f"the structure flow generates {model.config.resolution}^3 latents, i.e. {expected}^3 "
                              f"structures, but the data's structures are {grid.shape[-1]}^3; set "
                              f"model_overrides.resolution={grid.shape[-1] // self.structure_vae.config.downsample_factor}")
        with torch.no_grad():
            x0 = self._structure_latents(batch["names"], grid)
            cond = render_tokens(self.image_encoder, batch["images"], gens)
        out = self.flow.loss(model, x0, cond, gens, self.config.flow.cond_drop)
        return out.loss, {"flow": out.loss.detach()}

    def _structure_latents(self, names: list[str], grid: torch.Tensor) -> torch.Tensor:
        """The posterior means of the items' structures (as TRELLIS encodes them), each computed once and kept (up
        to :data:`LATENT_CACHE` items): the structure VAE is frozen and its mean deterministic, so this is exact."""
        out = []
        for i, name in enumerate(names):
            if name in self.latents:
                out.append(self.latents[name].to(grid.device))
                continue
            # one item at a time: the latent must not depend on the batch it first came in (exact resume)
            mean = self.structure_vae.encode(grid[i:i + 1])[0][0]
            if len(self.latents) < LATENT_CACHE:
                self.latents[name] = mean.cpu()
            out.append(mean)
        return torch.stack(out)


class SLatFlowTask:
    """Trains a :class:`~sparseflex.models.slat_flow.SLatFlow` (preset ``config.model``): rectified flow from noise to
    the SparseFlex VAE latents of a latent folder (``data encode``), normalised per channel by
    ``flow.latent_mean`` / ``flow.latent_std`` (taken from the folder's training-set statistics when the config has
    none, and stored with every checkpoint), conditioned on the frozen image encoder's tokens of one random render of
    the item."""

    def __init__(self, config: TrainConfig, dataset=None):
        from ..models.flow import RectifiedFlow
        from ..models.image_encoder import load_image_encoder
        f = config.flow
        if not f.latent_mean:
            if dataset is None or not hasattr(dataset, "stats"):
                raise OptionError("the SLat flow needs its latents' statistics: train on a latent folder (sparseflex "
                                  "data encode) or set flow.latent_mean and flow.latent_std")
            from ..data.latents import STD_FLOOR
            stats = dataset.stats
            f.latent_mean = [float(v) for v in stats["mean"]]
            f.latent_std = [max(float(v), STD_FLOOR) for v in stats["std"]]  # a constant channel stays finite
        if not f.vae and dataset is not None and hasattr(dataset, "config"):
            f.vae = str(dataset.config.get("checkpoint", ""))
        config.validate()
        self.config = config
        self.stats = {"mean": f.latent_mean, "std": f.latent_std}
        self.flow = RectifiedFlow(f.sigma_min, f.t_mean, f.t_std)
        self.image_encoder = load_image_encoder(f.image_encoder).requires_grad_(False)

    def build_model(self) -> nn.Module:
        from ..models.slat_flow import SLatFlow, get_slat_flow_config
        overrides = {**self.config.model_overrides, "use_checkpoint": self.config.activation_checkpointing}
        config = get_slat_flow_config(self.config.model, **overrides)
        if config.in_channels != len(self.stats["mean"]) or config.out_channels != config.in_channels:
            raise OptionError(f"the SLat flow works on {config.in_channels} channels but the latents have "
                              f"{len(self.stats['mean'])}")
        if config.cond_channels != self.image_encoder.dim:
            raise OptionError(f"the SLat flow expects {config.cond_channels}-channel image tokens but the image "
                              f"encoder {self.config.flow.image_encoder!r} gives {self.image_encoder.dim}; set "
                              f"model_overrides.cond_channels")
        return SLatFlow(config)

    @staticmethod
    def collate(items: list) -> dict:
        from ..data.latents import collate
        return collate(items)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ..data.latents import normalize_latent
        from ..nn import SparseTensor
        dev = next(model.parameters()).device
        self.image_encoder.to(dev).eval()
        if batch["resolution"] > model.config.resolution:
            raise OptionError(f"the SLat flow takes coordinates below {model.config.resolution} but the latents are "
                              f"at {batch['resolution']}; set model_overrides.resolution={batch['resolution']}")
        gens = _generators(batch)
        with torch.no_grad():
            cond = render_tokens(self.image_encoder, batch["images"], gens)
        x0 = SparseTensor(batch["coords"].to(dev), normalize_latent(batch["feats"].to(dev), self.stats),
                          len(gens))
        out = self.flow.loss(model, x0, cond, gens, self.config.flow.cond_drop)
        return out.loss, {"flow": out.loss.detach()}

"""Sizes of the SparseFlex VAE as small dataclasses: the public TripoSF release and CPU-sized variants."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from ..errors import OptionError

#: Rules for growing the input points into active latent voxels (see :meth:`VAEConfig.input_jitter`).
DILATIONS = ("fine", "release")


class ModelConfig:
    """Base of the models' size dataclasses: plain JSON-able dicts (what checkpoints store), named presets and JSON
    files, every mistake a one-line :class:`OptionError`. Subclasses set ``kind`` (for messages) and ``presets``."""
    kind: ClassVar[str] = "model"
    presets: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise OptionError(f"unknown {cls.kind} config fields: {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as exc:  # a value of the wrong kind (a list where a number belongs, ...)
            raise OptionError(f"{cls.kind} config: {exc}") from None

    @classmethod
    def preset(cls, name: str, **overrides):
        """A copy of the named preset with ``overrides`` applied."""
        if name not in cls.presets:
            raise OptionError(f"unknown {cls.kind} config {name!r}; choose one of {', '.join(cls.presets)}")
        return cls.from_dict({**cls.presets[name].to_dict(), **overrides})

    @classmethod
    def read(cls, name_or_path: str):
        """A preset name, or a JSON file of the config's fields."""
        if not str(name_or_path).lower().endswith(".json"):
            return cls.preset(name_or_path)
        try:
            with open(name_or_path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as exc:
            raise OptionError(f"{name_or_path}: cannot read the {cls.kind} config ({exc})".splitlines()[0]) from None
        if not isinstance(d, dict):
            raise OptionError(f"{name_or_path}: a {cls.kind} config is a JSON object of its fields")
        return cls.from_dict(d)


@dataclass
class VAEConfig(ModelConfig):
    """Every size of a :class:`~sparseflex.models.vae.SparseFlexVAE` (SPEC section 4).

    The output resolution is ``latent_resolution * 2 ** len(upsample_channels)``; the latent resolution is only the
    default, since no weight depends on it (absolute sinusoidal positions, local convolutions).
    """
    latent_resolution: int = 256
    latent_channels: int = 8
    # local PointNet
    pointnet_hidden: int = 256
    pointnet_blocks: int = 5
    pointnet_channels: int = 1024
    pointnet_pool: str = "mean"
    # sparse transformers
    model_channels: int = 768
    num_heads: int = 12
    encoder_blocks: int = 12
    decoder_blocks: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 8
    # self-pruning upsampling modules, then the 53-channel head
    upsample_channels: tuple[int, ...] = (192, 96)
    norm_groups: int = 32
    use_checkpoint: bool = False
    # inference conventions, stored with a model's weights (no weight depends on them)
    prune: bool = True               # decoding drops children whose pruning logit is < 0 (the release keeps all)
    voxel_dilation: str = "fine"     # input voxels: points grown by one output voxel, or the release's 1/(fR - 1)

    def __post_init__(self):
        self.upsample_channels = tuple(int(c) for c in self.upsample_channels)
        if self.model_channels % self.num_heads:
            raise OptionError(f"model_channels ({self.model_channels}) must be divisible by num_heads "
                              f"({self.num_heads})")
        for c in (self.model_channels, *self.upsample_channels):
            if c % self.norm_groups:
                raise OptionError(f"channels {c} must be divisible by norm_groups ({self.norm_groups})")
        if self.latent_resolution < 1 or not self.upsample_channels:
            raise OptionError("a VAE needs latent_resolution >= 1 and at least one upsampling module")
        if self.voxel_dilation not in DILATIONS:
            raise OptionError(f"voxel_dilation must be one of {', '.join(DILATIONS)}; got {self.voxel_dilation!r}")

    @property
    def upsample_factor(self) -> int:
        return 2 ** len(self.upsample_channels)

    @property
    def output_resolution(self) -> int:
        return self.latent_resolution * self.upsample_factor

    def input_jitter(self, resolution: int) -> float:
        """How far (in latent voxels, per axis) surface points are grown to find the active latent voxels at
        ``resolution``: one output voxel (``1/f``), or the release's ``1/(f R - 1)`` in normalised units (its 27
        offsets {-1, 0, 1}^3 reach the same voxels as the whole box), 256/1023 of a latent voxel at R = 256."""
        f = self.upsample_factor
        return 1.0 / f if self.voxel_dilation == "fine" else resolution / (f * resolution - 1)


CONFIGS = {
    # the public release: 256^3 in, 1024^3 out, 178,833,479 parameters; its inference keeps every child
    "triposf": VAEConfig(prune=False, voxel_dilation="release"),
    # CPU-sized: the same architecture, narrower and shallower
    "small": VAEConfig(latent_resolution=32, pointnet_hidden=64, pointnet_blocks=3, pointnet_channels=256,
                       model_channels=128, num_heads=4, encoder_blocks=4, decoder_blocks=4,
                       upsample_channels=(64, 32)),
    "tiny": VAEConfig(latent_resolution=16, pointnet_hidden=32, pointnet_blocks=2, pointnet_channels=64,
                      model_channels=64, num_heads=2, encoder_blocks=2, decoder_blocks=2,
                      upsample_channels=(64, 32)),
}


VAEConfig.kind, VAEConfig.presets = "VAE", CONFIGS


def get_config(name: str, **overrides) -> VAEConfig:
    """A copy of the named config (``triposf``, ``small``, ``tiny``) with ``overrides`` applied."""
    return VAEConfig.preset(name, **overrides)


def read_config(name_or_path: str) -> VAEConfig:
    """A named config (:func:`get_config`) or one read from a JSON file of :class:`VAEConfig` fields."""
    return VAEConfig.read(name_or_path)

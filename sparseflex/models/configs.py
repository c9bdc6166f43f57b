"""Sizes of the SparseFlex VAE as small dataclasses: the public TripoSF release and CPU-sized variants."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import OptionError


@dataclass
class VAEConfig:
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

    @property
    def upsample_factor(self) -> int:
        return 2 ** len(self.upsample_channels)

    @property
    def output_resolution(self) -> int:
        return self.latent_resolution * self.upsample_factor

    def to_dict(self) -> dict:
        d = asdict(self)
        d["upsample_channels"] = list(self.upsample_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OptionError(f"unknown VAE config fields: {', '.join(unknown)}")
        return cls(**d)


CONFIGS = {
    # the public release: 256^3 in, 1024^3 out, 178,833,479 parameters
    "triposf": VAEConfig(),
    # CPU-sized: the same architecture, narrower and shallower
    "small": VAEConfig(latent_resolution=32, pointnet_hidden=64, pointnet_blocks=3, pointnet_channels=256,
                       model_channels=128, num_heads=4, encoder_blocks=4, decoder_blocks=4,
                       upsample_channels=(64, 32)),
    "tiny": VAEConfig(latent_resolution=16, pointnet_hidden=32, pointnet_blocks=2, pointnet_channels=64,
                      model_channels=64, num_heads=2, encoder_blocks=2, decoder_blocks=2,
                      upsample_channels=(64, 32)),
}


def get_config(name: str, **overrides) -> VAEConfig:
    """A copy of the named config (``triposf``, ``small``, ``tiny``) with ``overrides`` applied."""
    if name not in CONFIGS:
        raise OptionError(f"unknown VAE config {name!r}; choose one of {', '.join(CONFIGS)}")
    return VAEConfig.from_dict({**CONFIGS[name].to_dict(), **overrides})

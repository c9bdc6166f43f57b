"""Training configuration: one small dataclass, loaded from a preset name, a JSON file or JSON text, then
overridden by command-line flags (``key=value``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import OptionError, check_range
from ..fit.views import ViewMix
from ..losses import RenderLossWeights

FORMAT = "sparseflex-train-1"
#: What the Trainer can train: the SparseFlex VAE, the structure VAE, and the image-conditioned flows generating the
#: structure latent and the structured (SparseFlex VAE) latent.
TASKS = ("vae", "structure-vae", "structure-flow", "slat-flow")


@dataclass
class VAELossConfig:
    """Weights of the VAE loss terms (SPEC section 3 defaults); the render weights are :class:`RenderLossWeights`."""
    render: RenderLossWeights = field(default_factory=RenderLossWeights)
    prune: float = 1.0                 # BCE of each pruning head against the prepared occupancy
    kl: float = 1e-6
    dev: float = 0.5                   # FlexiCubes L_dev
    sign: float = 0.01                 # SDF sign BCE on crossing edges
    weight_l1: float = 1e-3            # L1 on the raw FlexiCubes weights
    consistency: float = 0.1           # MSE of per-voxel corner predictions to their shared mean
    # Not in the paper: L1 between the corner SDF (in voxels) and the oriented-point SDF of the item's surface
    # samples, truncated at +-sdf_truncation voxels. A zero-initialised head predicts "everything inside", which
    # has no surface and hence no rendering gradient; this term starts the surface. 0 disables it.
    sdf: float = 1.0
    sdf_truncation: float = 2.0
    # Not in the paper: the prepared occupancy (voxels the surface passes through) grown by this many voxels per
    # level before it serves as the pruning target and teacher. A crossing edge needs all 4 voxels around it to
    # yield a face, so the bare surface voxels would leave holes wherever the surface runs near a voxel boundary.
    occupancy_dilation: int = 1


@dataclass
class StructureVAELossConfig:
    """Weights of the structure VAE loss (TRELLIS': soft Dice on the occupancy + 1e-3 KL)."""
    kl: float = 1e-3


@dataclass
class FlowConfig:
    """Rectified-flow training of an image-conditioned flow (SPEC section 4, TRELLIS' recipe)."""
    sigma_min: float = 1e-5
    t_mean: float = 1.0                 # t ~ sigmoid(N(t_mean, t_std)): logit-normal
    t_std: float = 1.0
    cond_drop: float = 0.1              # share of items trained unconditionally (classifier-free guidance)
    image_encoder: str = "tiny"         # image encoder preset or local weights (HF folder or DINOv2 .pth)
    structure_vae: str = ""             # structure-flow: the trained structure VAE (its encoder gives the targets)
    # slat-flow: the latents' per-channel statistics (measured over the training set when empty; stored with the
    # checkpoint so generation denormalises with them) and the SparseFlex VAE that encoded them
    latent_mean: list = field(default_factory=list)
    latent_std: list = field(default_factory=list)
    vae: str = ""


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data; stored in every checkpoint."""
    task: str = "vae"                   # one of TASKS
    model: str = "tiny"                 # preset of the task's model (VAE, structure VAE or structure flow config)
    model_overrides: dict = field(default_factory=dict)  # fields of the model config to change
    batch_size: int = 1                 # global: split evenly over the DDP ranks
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1           # cosine decay to lr * min_lr_ratio at the last step
    clip: float = 1.0                   # gradient norm clipping (0: off)
    ema_decay: float = 0.999            # 0: no EMA
    amp: bool = True                    # autocast (bfloat16, float16 + scaler when unsupported); CUDA only
    activation_checkpointing: bool = False
    find_unused_parameters: bool = True
    # VAE task
    views_per_item: int = 2
    image_size: int = 128
    visibility_ratio: float = 1.0       # frustum section: fraction of the decoded voxels each view sees
    views: ViewMix = field(default_factory=ViewMix)
    # progressive resolution: [[step, factor], ...] trains on the data coarsened by `factor` (a power of two) from
    # `step` on, e.g. [[0, 4], [2000, 2], [6000, 1]] for 256 -> 512 -> 1024 outputs with 1024^3 data
    progressive: list = field(default_factory=list)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    backend: str = "auto"               # visibility backend of the renderer
    # structure VAE and flow tasks
    structure_loss: StructureVAELossConfig = field(default_factory=StructureVAELossConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    # bookkeeping
    seed: int = 0
    num_workers: int = 0
    checkpoint_every: int = 100
    log_every: int = 1

    def validate(self) -> "TrainConfig":
        check_range("batch size", self.batch_size, 1, 1 << 20)
        check_range("steps", self.steps, 0, 1 << 40)
        check_range("lr", self.lr, 0, 1, low_open=True)
        check_range("weight decay", self.weight_decay, 0, 10)
        check_range("warmup steps", self.warmup_steps, 0, 1 << 40)
        check_range("min lr ratio", self.min_lr_ratio, 0, 1)
        check_range("clip", self.clip, 0)
        check_range("ema decay", self.ema_decay, 0, 1, high_open=True)
        check_range("views per item", self.views_per_item, 1, 1024)
        check_range("image size", self.image_size, 16, 4096)
        check_range("visibility ratio", self.visibility_ratio, 0, 1, low_open=True)
        check_range("checkpoint every", self.checkpoint_every, 0)
        check_range("log every", self.log_every, 1)
        check_range("num workers", self.num_workers, 0, 256)
        check_range("structure_loss.kl", self.structure_loss.kl, 0)
        check_range("flow.sigma_min", self.flow.sigma_min, 0, 1, high_open=True)
        check_range("flow.t_std", self.flow.t_std, 0, 10, low_open=True)
        check_range("flow.t_mean", self.flow.t_mean, -10, 10)
        check_range("flow.cond_drop", self.flow.cond_drop, 0, 1)
        f = self.flow
        stats = (f.latent_mean, f.latent_std)
        if not all(isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               and math.isfinite(x) for x in v) for v in stats) \
                or len(f.latent_mean) != len(f.latent_std) or any(x <= 0 for x in f.latent_std):
            raise OptionError("flow.latent_mean and flow.latent_std must be lists of finite numbers of one length, "
                              "the std positive")
        for entry in self.progressive:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, int) for v in entry)
                    and entry[1] >= 1 and not entry[1] & (entry[1] - 1)):
                raise OptionError(f"progressive must be a list of [step, factor] pairs, factor a power of two; "
                                  f"got {entry!r}")
        return self

    def downsample_at(self, step: int) -> int:
        """The progressive schedule's resolution divisor at ``step`` (1: the data's own resolution)."""
        factor = 1
        for start, f in sorted(self.progressive):
            if step >= start:
                factor = f
        return factor

    # -- (de)serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        _check_keys(cls, d, "training config")
        if "views" in d:
            d["views"] = _build(ViewMix, d["views"], "views")
        if "structure_loss" in d:
            d["structure_loss"] = _build(StructureVAELossConfig, d["structure_loss"], "structure_loss")
        if "flow" in d:
            d["flow"] = _build(FlowConfig, d["flow"], "flow")
        if "loss" in d:
            loss = dict(d["loss"])
            _check_keys(VAELossConfig, loss, "loss")
            if "render" in loss:
                loss["render"] = _build(RenderLossWeights, loss["render"], "loss.render")
            d["loss"] = VAELossConfig(**loss)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        config = cls(**d)
        _check_types(config, cls())
        return config.validate()

    def override(self, assignments: list[str]) -> "TrainConfig":
        """A copy with ``key=value`` assignments applied (dotted keys reach nested fields; values are JSON or
        plain strings), e.g. ``lr=3e-4``, ``loss.kl=1e-5``, ``loss.render.depth=5``."""
        d = self.to_dict()
        for text in assignments:
            key, sep, raw = text.partition("=")
            if not sep or not key:
                raise OptionError(f"expected key=value, got {text!r}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            *path, last = key.split(".")
            node = d
            for part in path:
                if not isinstance(node.get(part), dict):
                    raise OptionError(f"unknown training config key {key!r}")
                node = node[part]
            if last not in node:
                raise OptionError(f"unknown training config key {key!r}")
            node[last] = value
        return TrainConfig.from_dict(d)


#: Named presets per task: small ones train on a CPU; "triposf" follows the paper's recipe (batch 64, 1024^3
#: output), "trellis" TRELLIS' (structure VAE and flow at 64^3 -> 16^3, batch 4 / 8 per GPU, lr 1e-4, EMA 0.9999).
#: The CPU VAE presets weight depth 1 instead of 10: with few views per step the depth L1 (world units, where a missing
#: surface costs the whole depth) dominates the gradient with spikes; overfitting a torus at 32^3 for 300 steps
#: reached F-score@0.01 98.0 / 98.5 % with depth 1 against 54.9-96.9 % with depth 10.
_CPU_LOSS = {"render": {"depth": 1.0}}
PRESETS = {
    "vae": {
        "tiny": dict(model="tiny", batch_size=1, steps=500, lr=1e-3, warmup_steps=20, image_size=96,
                     views_per_item=2, ema_decay=0.99, checkpoint_every=100, loss=_CPU_LOSS),
        "small": dict(model="small", batch_size=2, steps=20_000, lr=3e-4, warmup_steps=200, image_size=128,
                      views_per_item=2, ema_decay=0.999, checkpoint_every=200, loss=_CPU_LOSS),
        "triposf": dict(model="triposf", batch_size=64, steps=400_000, lr=1e-4, warmup_steps=1000, image_size=512,
                        views_per_item=4, visibility_ratio=0.1, ema_decay=0.9999, activation_checkpointing=True,
                        checkpoint_every=1000),
    },
    "structure-vae": {
        "tiny": dict(model="tiny", batch_size=4, steps=500, lr=1e-3, warmup_steps=20, weight_decay=0.0,
                     ema_decay=0.99, checkpoint_every=100),
        "small": dict(model="small", batch_size=8, steps=5_000, lr=1e-3, warmup_steps=100, weight_decay=0.0,
                      ema_decay=0.999, checkpoint_every=500),
        "trellis": dict(model="trellis", batch_size=32, steps=1_000_000, lr=1e-4, warmup_steps=1000,
                        weight_decay=0.0, ema_decay=0.9999, checkpoint_every=10_000),
    },
    "structure-flow": {
        "tiny": dict(model="tiny", batch_size=4, steps=1000, lr=1e-3, warmup_steps=20, weight_decay=0.0,
                     ema_decay=0.99, checkpoint_every=200),
        "small": dict(model="small", batch_size=8, steps=20_000, lr=3e-4, warmup_steps=200, weight_decay=0.0,
                      ema_decay=0.999, checkpoint_every=1000),
        "trellis": dict(model="trellis", batch_size=64, steps=1_000_000, lr=1e-4, warmup_steps=1000,
                        weight_decay=0.0, ema_decay=0.9999, activation_checkpointing=True, checkpoint_every=10_000,
                        flow={"image_encoder": "dinov2-vitl14-reg"}),
    },
    "slat-flow": {
        "tiny": dict(model="tiny", batch_size=2, steps=1000, lr=1e-3, warmup_steps=20, weight_decay=0.0,
                     ema_decay=0.99, checkpoint_every=200),
        "small": dict(model="small", batch_size=4, steps=20_000, lr=3e-4, warmup_steps=200, weight_decay=0.0,
                      ema_decay=0.999, checkpoint_every=1000),
        "trellis": dict(model="trellis", batch_size=64, steps=1_000_000, lr=1e-4, warmup_steps=1000,
                        weight_decay=0.0, ema_decay=0.9999, activation_checkpointing=True, checkpoint_every=10_000,
                        flow={"image_encoder": "dinov2-vitl14-reg"}),
    },
}


def load_config(name_or_json: str, task: str = "vae") -> TrainConfig:
    """A preset name of ``task`` (see :data:`PRESETS`), a path to a JSON file, or JSON text (``{...}``); JSON may
    name a ``preset`` to start from. The result trains ``task``."""
    if task not in PRESETS:
        raise OptionError(f"unknown training task {task!r}; choose one of {', '.join(TASKS)}")
    presets = PRESETS[task]
    text = name_or_json.strip()
    if text in presets:
        return TrainConfig.from_dict({**presets[text], "task": task})
    if text.startswith("{"):
        source = "JSON text"
    else:
        path = Path(text)
        if not path.is_file():
            raise OptionError(f"config {text!r} is neither a {task} preset ({', '.join(presets)}) nor a JSON file")
        source, text = str(path), path.read_text()
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"config {source} is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise OptionError(f"config {source} must be a JSON object")
    preset = d.pop("preset", None)
    if preset is not None:
        if preset not in presets:
            raise OptionError(f"unknown {task} preset {preset!r} in {source}; choose from {', '.join(presets)}")
        d = {**presets[preset], **d}
    if d.get("task", task) != task:
        raise OptionError(f"config {source} is for task {d['task']!r}, not {task!r}")
    return TrainConfig.from_dict({**d, "task": task})


def _check_keys(cls, d: dict, what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise OptionError(f"unknown {what} key(s): {', '.join(unknown)}")


def _check_types(config, default) -> None:
    """Scalars must have their default's type (an integer may stand for a float)."""
    for f in fields(config):
        want, value = type(getattr(default, f.name)), getattr(config, f.name)
        if want in (int, float, bool, str):
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            ok = ok or (want is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise OptionError(f"training config {f.name} must be {want.__name__}; got {value!r}")


def _build(cls, d, what: str):
    if not isinstance(d, dict):
        raise OptionError(f"{what} must be a JSON object; got {d!r}")
    _check_keys(cls, d, what)
    try:
        return cls(**d)
    except TypeError as exc:
        raise OptionError(f"{what}: {exc}") from None

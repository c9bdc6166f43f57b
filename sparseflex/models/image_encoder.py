"""Image conditioning for image-to-3D: DINOv2 (ViT-L/14 with registers, as TRELLIS uses it) in plain PyTorch.

:class:`ImageEncoder` is the DINOv2 vision transformer, written for this project: a 14x14/stride-14 convolution
embeds patches, a CLS token and the learned position embedding of a square patch grid (37x37 at 518 px) are added,
register tokens go in right after CLS, then pre-norm blocks (LayerNorm eps 1e-6, attention through
``scaled_dot_product_attention``, exact-erf GELU MLP, LayerScale on both branches). Its output is what TRELLIS feeds
its flows: EVERY token (CLS, registers, patches) of the last block BEFORE DINOv2's final norm, through a LayerNorm
without affine parameters (eps 1e-5) -> ``[B, 1 + registers + patches, width]`` (``[B, 1374, 1024]`` for ViT-L/14-reg
at 518 px). The final ``norm`` and ``mask_token`` are kept as parameters, unused by :meth:`ImageEncoder.forward`, so
that a checkpoint maps onto the model one to one (and the parameter count is the published one).

Weights load only from local files (:func:`load_image_encoder`), never from the network:

* a Hugging Face folder (``config.json`` with ``model_type`` ``dinov2_with_registers`` or ``dinov2``, weights in
  ``model.safetensors`` or ``pytorch_model.bin``);
* the DINOv2 repository's state dict (``dinov2_vitl14_reg4_pretrain.pth``; a ``.safetensors`` file with the same keys
  works too).

Pickled files are read with ``torch.load(weights_only=True)``: tensors only, nothing in them runs.

Parameter names (ours) and where they come from::

    ours                          DINOv2 .pth                    Hugging Face
    cls_token        [1, 1, C]    cls_token                      embeddings.cls_token
    register_tokens  [1, R, C]    register_tokens                embeddings.register_tokens
    pos_embed        [1, 1+G*G, C] pos_embed                     embeddings.position_embeddings
    mask_token       [1, C]       mask_token                     embeddings.mask_token (zeros when absent)
    patch_embed.*    [C, 3, P, P] patch_embed.proj.*             embeddings.patch_embeddings.projection.*
    blocks.i.norm1.*              blocks.i.norm1.*               encoder.layer.i.norm1.*
    blocks.i.qkv.*   [3C, C]      blocks.i.attn.qkv.*            encoder.layer.i.attention.attention.{query,key,value}.*
                                                                 (or attention.{q,k,v}_proj.*), stacked q, k, v
    blocks.i.proj.*               blocks.i.attn.proj.*           encoder.layer.i.attention.output.dense.* (or o_proj)
    blocks.i.ls1     [C]          blocks.i.ls1.gamma             encoder.layer.i.layer_scale1.lambda1
    blocks.i.norm2.*              blocks.i.norm2.*               encoder.layer.i.norm2.*
    blocks.i.fc1.*, blocks.i.fc2.* blocks.i.mlp.fc{1,2}.*        encoder.layer.i.mlp.fc{1,2}.*
    blocks.i.ls2     [C]          blocks.i.ls2.gamma             encoder.layer.i.layer_scale2.lambda1
    norm.*                        norm.*                         layernorm.*
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, OptionError
from ..io import safe_torch_load
from .checkpoint import load_weights

#: ImageNet statistics DINOv2 was trained with; :meth:`ImageEncoder.forward` normalises with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Sizes of an :class:`ImageEncoder` and how it resizes its position embedding.

    ``image_size`` is the size the position embedding was learned at (its grid is ``image_size // patch_size``
    square); other input sizes interpolate it bicubically, either to the target grid size (``interpolate_offset``
    0: DINOv2's register models and transformers) or with DINOv2's legacy scale factor ``(grid + offset) / old_grid``
    (0.1 for DINOv2's models without registers), with or without antialiasing.
    """
    name: str = "custom"
    width: int = 1024
    depth: int = 24
    heads: int = 16
    patch_size: int = 14
    image_size: int = 518
    num_registers: int = 4
    mlp_hidden: int = 4096
    ln_eps: float = 1e-6
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0

    def __post_init__(self):
        for key in ("width", "depth", "heads", "patch_size", "image_size", "mlp_hidden"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise OptionError(f"image encoder {key} must be a positive integer; got {getattr(self, key)!r}")
        if self.num_registers < 0:
            raise OptionError(f"image encoder num_registers must be >= 0; got {self.num_registers}")
        if self.width % self.heads:
            raise OptionError(f"image encoder width {self.width} is not a multiple of heads {self.heads}")
        if self.image_size < self.patch_size:
            raise OptionError(f"image encoder image_size {self.image_size} is smaller than a patch")

    @property
    def grid(self) -> int:
        """Side of the patch grid the position embedding was learned for."""
        return self.image_size // self.patch_size

    def num_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Tokens per image at ``height x width`` pixels (default: ``image_size`` square)."""
        h = self.image_size if height is None else height
        w = h if width is None else width
        return 1 + self.num_registers + (h // self.patch_size) * (w // self.patch_size)


#: Presets. The DINOv2 ones have the published architectures; ``tiny`` is a CPU-sized stand-in (random weights).
IMAGE_ENCODER_CONFIGS: dict[str, ImageEncoderConfig] = {
    "dinov2-vitl14-reg": ImageEncoderConfig("dinov2-vitl14-reg", 1024, 24, 16, mlp_hidden=4096),
    "dinov2-vitb14-reg": ImageEncoderConfig("dinov2-vitb14-reg", 768, 12, 12, mlp_hidden=3072),
    "tiny": ImageEncoderConfig("tiny", 64, 2, 2, image_size=98, mlp_hidden=256),
}

# where the published weights of the big presets are (the message of load_image_encoder)
_WEIGHTS_HINT = {
    "dinov2-vitl14-reg": ("dinov2_vitl14_reg4_pretrain.pth", "facebook/dinov2-with-registers-large"),
    "dinov2-vitb14-reg": ("dinov2_vitb14_reg4_pretrain.pth", "facebook/dinov2-with-registers-base"),
}


def get_image_encoder_config(name: str) -> ImageEncoderConfig:
    """The preset called ``name`` (see :data:`IMAGE_ENCODER_CONFIGS`)."""
    if name not in IMAGE_ENCODER_CONFIGS:
        raise OptionError(f"unknown image encoder {name!r}; presets: {', '.join(IMAGE_ENCODER_CONFIGS)}")
    return IMAGE_ENCODER_CONFIGS[name]


class _Block(nn.Module):
    """Pre-norm transformer block with LayerScale: ``x + ls1 * attn(norm1(x))``, then ``+ ls2 * mlp(norm2(x))``."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        c = cfg.width
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(c, eps=cfg.ln_eps)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.ls1 = nn.Parameter(torch.ones(c))
        self.norm2 = nn.LayerNorm(c, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(c, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, c)
        self.ls2 = nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        # the fused projection's rows are q, then k, then v; each splits into heads of c // heads channels
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.ls1 * self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ImageEncoder(nn.Module):
    """DINOv2 image encoder: ``[B, 3, H, W]`` images in [0, 1] -> ``[B, T, C]`` conditioning tokens.

    Build one with :func:`load_image_encoder` (weights from a file) or ``ImageEncoder(config)`` (random weights).
    """

    def __init__(self, config: ImageEncoderConfig | str = "tiny"):
        super().__init__()
        cfg = get_image_encoder_config(config) if isinstance(config, str) else config
        self.config = cfg
        c = cfg.width
        self.patch_embed = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, c)) if cfg.num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, c))
        self.mask_token = nn.Parameter(torch.zeros(1, c))  # DINOv2's masked pretraining only; kept for the checkpoint
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(c, eps=cfg.ln_eps)  # DINOv2's final norm; the conditioning skips it (see forward)
        self.reset_parameters()

    @property
    def dim(self) -> int:
        """Channels of a token."""
        return self.config.width

    def reset_parameters(self):
        """Random weights of the right scale (truncated normal 0.02 as DINOv2), for the ``tiny`` stand-in."""
        if self.cls_token.is_meta:
            return
        for p in (self.pos_embed, self.cls_token, self.patch_embed.weight):
            nn.init.trunc_normal_(p, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for blk in self.blocks:
            for lin in (blk.qkv, blk.proj, blk.fc1, blk.fc2):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

    def interpolate_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """The position embedding ``[1, 1 + gh * gw, C]`` for an input of ``height x width`` pixels.

        As DINOv2 (and transformers) do: the learned one when the patch count is the learned one and the input is
        square, else the patch grid resized bicubically in float32 (``align_corners=False``, antialias and legacy
        offset per the config), the CLS position kept.
        """
        cfg, pos = self.config, self.pos_embed
        gh, gw = height // cfg.patch_size, width // cfg.patch_size
        n = pos.shape[1] - 1
        if gh * gw == n and height == width:
            return pos
        m = cfg.grid
        grid = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if cfg.interpolate_offset:
            # DINOv2's legacy kludge: a scale factor slightly above grid / m; torch maps output pixel centres with
            # this factor (not with the output size), so the result differs from the plain resize
            size = dict(scale_factor=((gh + cfg.interpolate_offset) / m, (gw + cfg.interpolate_offset) / m))
        else:
            size = dict(size=(gh, gw))
        grid = F.interpolate(grid, mode="bicubic", align_corners=False, antialias=cfg.interpolate_antialias, **size)
        if tuple(grid.shape[-2:]) != (gh, gw):
            raise InputError(f"position embedding resized to {tuple(grid.shape[-2:])} instead of {(gh, gw)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], grid.to(pos.dtype)], dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Every token of the last block before any final norm (DINOv2's ``x_prenorm``), ``[B, T, C]``, from
        normalised images."""
        b, _, h, w = images.shape
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.interpolate_pos_embed(h, w)
        if self.register_tokens is not None:
            # registers carry no position: they go in after the position embedding, right behind CLS
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Conditioning tokens ``[B, 1 + registers + (H // 14) * (W // 14), C]`` of ``images`` ``[B, 3, H, W]``,
        float in [0, 1] (premultiplied RGB, as :func:`~sparseflex.data.images.preprocess_image` makes them).

        ImageNet normalisation happens here; the tokens are the last block's (before DINOv2's final norm) through a
        LayerNorm without affine parameters, as TRELLIS conditions its flows.
        """
        p = self.config.patch_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] < p or images.shape[3] < p:
            raise InputError(f"image encoder needs images [B, 3, H, W] with H, W >= {p}; got {list(images.shape)}")
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        x = self.features((images.float() - mean) / std)
        return F.layer_norm(x, x.shape[-1:])

    @staticmethod
    def unconditional(cond: torch.Tensor) -> torch.Tensor:
        """The unconditional input for classifier-free guidance: zeros shaped like the conditioning ``cond``."""
        return torch.zeros_like(cond)


# ---------------------------------------------------------------------------------------------------------- loading

def load_image_encoder(name_or_path: str | os.PathLike, device=None, *, num_heads: int | None = None) -> ImageEncoder:
    """An :class:`ImageEncoder` in eval mode, from a preset name or from local weights.

    ``tiny`` gives fixed random weights (seed 0: the same in training and sampling); the DINOv2 presets have none
    built in, and the message says where to get them.
    A folder loads as a Hugging Face model folder; a file as the DINOv2 repository's state dict. That layout has no
    config, so its sizes come from the tensor shapes and the head count is ``width // 64`` (every DINOv2 model has
    64-channel heads) unless ``num_heads`` is given. Any problem is a one-line :class:`InputError` naming the file.
    """
    key = str(name_or_path)
    if key in IMAGE_ENCODER_CONFIGS:
        if key in _WEIGHTS_HINT:
            pth, hf = _WEIGHTS_HINT[key]
            raise InputError(f"{key}: no weights are built in; download {pth} (DINOv2 repository, "
                             f"facebookresearch/dinov2) or the Hugging Face folder {hf}, then give its path")
        # fixed random weights: a flow trained on this stand-in is conditioned by the same encoder when it samples
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = ImageEncoder(IMAGE_ENCODER_CONFIGS[key])
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder, and not an image encoder preset "
                             f"({', '.join(IMAGE_ENCODER_CONFIGS)})")
        if path.is_dir():
            cfg, state, source = _read_hf_folder(path)
            if num_heads is not None and num_heads != cfg.heads:
                raise InputError(f"{path}: config.json says {cfg.heads} heads, not num_heads={num_heads}")
        else:
            cfg, state, source = *_read_original(path, num_heads), path
        with torch.device("meta"):
            model = ImageEncoder(cfg)
        state.setdefault("mask_token", torch.zeros(1, cfg.width))  # only masked pretraining uses it
        load_weights(model, state, source=str(source))
    return model.to(device if device is not None else "cpu").eval()


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Name -> tensor from a safetensors file or a ``torch.save``-d state dict (``weights_only=True``)."""
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: weights file is empty")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors alike: the file cannot be used
            raise InputError(f"{path}: truncated or corrupt safetensors file ({exc})".splitlines()[0]) from None
    else:
        try:
            state = safe_torch_load(path)  # weights_only: a crafted pickle is refused, nothing in it runs
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated, corrupt or not a pickle at all
            raise InputError(f"{path}: not a readable PyTorch state dict ({type(exc).__name__}: {exc})"
                             .splitlines()[0]) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def _need(state: dict, key: str, path, ndim: int) -> torch.Tensor:
    if key not in state:
        raise InputError(f"{path}: missing {key}; not a DINOv2 state dict")
    if state[key].dim() != ndim:
        raise InputError(f"{path}: {key} has shape {list(state[key].shape)}; expected {ndim} dimensions")
    return state[key]


def _read_original(path: Path, num_heads: int | None) -> tuple[ImageEncoderConfig, dict[str, torch.Tensor]]:
    """Config (from the tensor shapes: the file stores none) and our state dict of a DINOv2-repository file."""
    state = _read_tensors(path)
    width = _need(state, "cls_token", path, 3).shape[-1]
    patch = _need(state, "patch_embed.proj.weight", path, 4).shape[-1]
    positions = _need(state, "pos_embed", path, 3).shape[1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions or grid == 0:
        raise InputError(f"{path}: pos_embed holds {positions} patch positions, not a square grid")
    if any(".mlp.w12." in k or ".mlp.w3." in k for k in state):
        raise InputError(f"{path}: SwiGLU MLP blocks (ViT-g) are not supported")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise InputError(f"{path}: no transformer blocks (blocks.N.*); not a DINOv2 state dict")
    hidden = _need(state, "blocks.0.mlp.fc1.weight", path, 2).shape[0]
    registers = _need(state, "register_tokens", path, 3).shape[1] if "register_tokens" in state else 0
    if num_heads is None and width % 64:
        raise InputError(f"{path}: width {width} is not a multiple of DINOv2's 64-channel heads; give num_heads")
    heads = num_heads or width // 64
    try:
        # DINOv2's hub models: registers -> resize to the grid with antialiasing; none -> legacy 0.1 offset
        cfg = ImageEncoderConfig(path.stem, width, max(blocks) + 1, heads, patch, grid * patch, registers, hidden,
                                 interpolate_antialias=registers > 0,
                                 interpolate_offset=0.0 if registers else 0.1)
    except OptionError as exc:
        raise InputError(f"{path}: {exc}") from None
    return cfg, _original_to_ours(state, path)


_ORIGINAL_KEYS = [
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.(ls[12])\.gamma", r"blocks.\1.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.(norm[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"(cls_token|register_tokens|pos_embed|mask_token|norm\.weight|norm\.bias)", r"\1"),
]

_HF_KEYS = [
    (r"embeddings\.(cls_token|register_tokens|mask_token)", r"\1"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (r"encoder\.layer\.(\d+)\.(norm[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
# q, k and v are separate in transformers (the checkpoints' names, or this transformers' own); ours are stacked
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(weight|bias)")


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def _original_to_ours(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        new = _rename(k, _ORIGINAL_KEYS)
        if new is None:
            raise InputError(f"{path}: unexpected key {k} for a DINOv2 state dict")
        out[new] = v
    return out


def _hf_to_ours(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    out, qkv = {}, {}
    for k, v in state.items():
        if (m := _HF_QKV.fullmatch(k)) is not None:
            part = "qkv".index((m.group(2) or m.group(3))[0])
            qkv.setdefault((int(m.group(1)), m.group(4)), {})[part] = (k, v)
            continue
        new = _rename(k, _HF_KEYS)
        if new is None:
            raise InputError(f"{path}: unexpected key {k} for a DINOv2 model")
        out[new] = v
    for (block, kind), parts in sorted(qkv.items()):
        if len(parts) != 3:
            lacking = "/".join(("query", "key", "value")[i] for i in range(3) if i not in parts)
            raise InputError(f"{path}: block {block} has no attention {lacking} {kind}")
        shapes = {tuple(v.shape) for _, v in parts.values()}
        if len(shapes) != 1:
            raise InputError(f"{path}: block {block} attention query/key/value {kind}s differ in shape: "
                             f"{sorted(shapes)}")
        out[f"blocks.{block}.qkv.{kind}"] = torch.cat([parts[i][1] for i in range(3)], dim=0)
    return out


_HF_TYPES = {"dinov2_with_registers", "dinov2"}


def _read_hf_folder(folder: Path) -> tuple[ImageEncoderConfig, dict[str, torch.Tensor], Path]:
    """Config, our state dict and the weights file of a Hugging Face DINOv2 folder."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{folder}: no config.json; not a Hugging Face model folder")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{cfg_path}: unreadable JSON ({exc})".splitlines()[0]) from None
    if not isinstance(hf, dict) or hf.get("model_type") not in _HF_TYPES:
        found = hf.get("model_type") if isinstance(hf, dict) else None
        raise InputError(f"{cfg_path}: model_type {found!r} is not one of {sorted(_HF_TYPES)}")
    registers = hf["model_type"] == "dinov2_with_registers"
    # transformers' defaults, for keys a config.json may leave out
    get = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
           "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": 224, "patch_size": 16, "num_channels": 3,
           "qkv_bias": True, "use_swiglu_ffn": False, "num_register_tokens": 4 if registers else 0}
    get.update({k: hf[k] for k in get if k in hf})
    if not registers:
        get["num_register_tokens"] = 0
    unsupported = [f"{k}={get[k]!r}" for k, ok in (("hidden_act", "gelu"), ("num_channels", 3), ("qkv_bias", True),
                                                   ("use_swiglu_ffn", False)) if get[k] != ok]
    if unsupported:
        raise InputError(f"{cfg_path}: unsupported {', '.join(unsupported)}")
    size, patch = get["image_size"], get["patch_size"]
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    patch = patch[0] if isinstance(patch, (list, tuple)) and len(set(patch)) == 1 else patch
    try:
        width = int(get["hidden_size"])
        cfg = ImageEncoderConfig(
            folder.name, width, int(get["num_hidden_layers"]), int(get["num_attention_heads"]), int(patch),
            int(size), int(get["num_register_tokens"]), int(width * get["mlp_ratio"]), float(get["layer_norm_eps"]),
            # transformers resizes to the target grid; antialiased for the register models only
            interpolate_antialias=registers, interpolate_offset=0.0)
    except (TypeError, ValueError, OptionError) as exc:
        raise InputError(f"{cfg_path}: unusable sizes ({exc})".splitlines()[0]) from None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            weights = folder / name
            break
    else:
        raise InputError(f"{folder}: no model.safetensors or pytorch_model.bin")
    return cfg, _hf_to_ours(_read_tensors(weights), weights), weights


@torch.no_grad()
def image_tokens(encoder: ImageEncoder, images: list) -> torch.Tensor:
    """Conditioning tokens ``[B, T, C]`` of images: files, or ``[H, W, 3 | 4]`` arrays (uint8, or float in [0, 1]),
    each cropped and resized to the encoder's input size by :func:`~sparseflex.data.images.preprocess_image`."""
    from ..data.images import preprocess_image
    if not images:
        raise InputError("no images to encode")
    size = encoder.config.image_size
    batch = []
    for image in images:
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            image = image.astype(np.float32) / 255
        batch.append(preprocess_image(image, size))
    device = encoder.patch_embed.weight.device
    return encoder(torch.stack(batch).to(device))

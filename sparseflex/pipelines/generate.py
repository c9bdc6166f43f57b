"""Image-to-3D (SPEC section 4): image -> structure -> structured latent -> SparseFlex -> mesh.

Five parts, named by one pipeline file (JSON, :func:`save_pipeline` / :func:`read_pipeline`): the image encoder, the
structure flow and structure VAE (stage 1, :class:`~sparseflex.pipelines.structure.StructurePipeline`), the SLat flow
(stage 2: the SparseFlex VAE's latent on the generated voxels, by Euler steps with classifier-free guidance, then
denormalised with the statistics stored in its checkpoint) and the SparseFlex VAE whose decoder gives the mesh.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data.mesh import Mesh
from ..errors import InputError, OptionError
from ..flexicubes.representation import SparseFlex
from ..io import write_atomic
from ..models.checkpoint import load_model, load_weights, read_checkpoint
from ..models.image_encoder import ImageEncoder, image_tokens, load_image_encoder
from ..models.slat_flow import SLatFlow, SLatFlowConfig
from ..models.vae import SparseFlexVAE
from ..nn import SparseTensor
from .reconstruct import Latent, decode_latent
from .samplers import DEFAULT_GUIDANCE, DEFAULT_SHIFT, DEFAULT_STEPS, euler_sample, gaussian_noise, guided_velocity
from .structure import StructurePipeline, load_structure_flow, load_structure_vae

PIPELINE_FORMAT = "sparseflex-pipeline-1"
#: The parts a pipeline file names: checkpoints, and the image encoder (a preset or local weights).
PARTS = ("image_encoder", "structure_flow", "structure_vae", "slat_flow", "vae")


def load_slat_flow(path: str | os.PathLike, device=None) -> tuple[SLatFlow, dict, dict]:
    """A trained :class:`SLatFlow` (EMA weights) in eval mode, its latent statistics ``{"mean", "std"}`` and its
    run's training config."""
    ck = read_checkpoint(path, task="slat-flow")
    train = ck.train_config or {}
    flow = train.get("flow") if isinstance(train.get("flow"), dict) else {}
    if ck.config is None or not flow.get("latent_mean"):
        raise InputError(f"{path}: the checkpoint holds no SLat flow config or latent statistics")
    model = SLatFlow(SLatFlowConfig.from_dict(ck.config))
    load_weights(model, ck.state, str(path))
    return model.to(device or "cpu").eval(), {"mean": flow["latent_mean"], "std": flow["latent_std"]}, train


# -- the pipeline file ------------------------------------------------------------------------------------------------

def read_pipeline(path: str | os.PathLike) -> dict[str, str]:
    """The parts named by a pipeline file, relative paths resolved against its folder; one-line errors for a file
    that is not one, or a part that is missing."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{p}: not a readable pipeline file ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != PIPELINE_FORMAT:
        raise InputError(f"{p}: not a SparseFlex pipeline file (write one with `sparseflex pipeline save`)")
    parts = {}
    for name in PARTS:
        value = doc.get(name)
        if not isinstance(value, str) or not value:
            raise InputError(f"{p}: names no {name}")
        if name == "image_encoder" and not any(c in value for c in "/\\.") and not (p.parent / value).exists():
            parts[name] = value  # a preset name
            continue
        part = Path(value) if Path(value).is_absolute() else p.parent / value
        if not part.exists():
            raise InputError(f"{p}: its {name} {part} does not exist")
        parts[name] = str(part)
    return parts


def save_pipeline(path: str | os.PathLike, structure_flow: str | os.PathLike, slat_flow: str | os.PathLike,
                  structure_vae: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                  image_encoder: str | None = None) -> dict[str, str]:
    """Write a pipeline file naming the five parts (checked to load and fit together first). The structure VAE,
    the VAE and the image encoder default to those the flows' training runs recorded. Paths are stored relative
    to the file's folder when they lie under it, so the folder can move as a whole."""
    _, structure_train = load_structure_flow(structure_flow)
    _, _, slat_train = load_slat_flow(slat_flow)
    s_flow = structure_train.get("flow", {})
    l_flow = slat_train.get("flow", {})
    parts = {"structure_flow": str(structure_flow), "slat_flow": str(slat_flow),
             "structure_vae": str(structure_vae or s_flow.get("structure_vae") or ""),
             "vae": str(vae or l_flow.get("vae") or ""),
             "image_encoder": str(image_encoder or s_flow.get("image_encoder") or "tiny")}
    for name in ("structure_vae", "vae"):
        if not parts[name]:
            raise OptionError(f"name the {name.replace('_', ' ')} checkpoint (the flows' runs do not record one)")
    if image_encoder is None and l_flow.get("image_encoder", parts["image_encoder"]) != parts["image_encoder"]:
        raise OptionError(f"the structure flow was trained with image encoder {parts['image_encoder']!r} but the "
                          f"SLat flow with {l_flow.get('image_encoder')!r}")
    ImageTo3DPipeline.from_parts(parts)  # every part loads and they fit together
    folder = Path(path).resolve().parent
    doc = {"format": PIPELINE_FORMAT}
    for name, value in parts.items():
        target = Path(value)
        if target.exists():
            target = target.resolve()
            value = str(target.relative_to(folder)) if target.is_relative_to(folder) else str(target)
        doc[name] = value
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())
    return doc


# -- generation -------------------------------------------------------------------------------------------------------

@dataclass
class GenerationResult:
    """One generated shape: the mesh and SparseFlex (in the cube [-0.5, 0.5]^3), the structure's voxels, the latent,
    and the seconds spent in each stage."""
    mesh: Mesh
    sparseflex: SparseFlex
    structure: torch.Tensor
    latent: Latent
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageTo3DPipeline:
    """The whole generator: :meth:`from_file` a pipeline file, then call it on images."""
    structure: StructurePipeline
    slat_flow: SLatFlow
    stats: dict
    vae: SparseFlexVAE

    @classmethod
    def from_file(cls, path: str | os.PathLike, device=None) -> "ImageTo3DPipeline":
        return cls.from_parts(read_pipeline(path), device)

    @classmethod
    def from_parts(cls, parts: dict[str, str], device=None) -> "ImageTo3DPipeline":
        encoder: ImageEncoder = load_image_encoder(parts["image_encoder"], device)
        s_flow, _ = load_structure_flow(parts["structure_flow"], device)
        structure = StructurePipeline(s_flow, load_structure_vae(parts["structure_vae"], device), encoder)
        structure.check()
        slat, stats, _ = load_slat_flow(parts["slat_flow"], device)
        vae = load_model(parts["vae"], device=device)
        pipe = cls(structure, slat, stats, vae)
        pipe.check()
        return pipe

    def check(self) -> None:
        """The parts fit together (widths, channels, resolutions), else a one-line error."""
        slat, vae = self.slat_flow.config, self.vae.config
        if slat.cond_channels != self.structure.image_encoder.dim:
            raise InputError(f"the SLat flow expects {slat.cond_channels}-channel image tokens but the image encoder "
                             f"gives {self.structure.image_encoder.dim}")
        if slat.in_channels != vae.latent_channels or len(self.stats["mean"]) != vae.latent_channels:
            raise InputError(f"the SLat flow generates {slat.in_channels}-channel latents but the VAE decodes "
                             f"{vae.latent_channels}")
        if self.structure.resolution > slat.resolution:
            raise InputError(f"the structure flow generates {self.structure.resolution}^3 structures but the SLat "
                             f"flow takes coordinates below {slat.resolution}")

    @property
    def resolution(self) -> int:
        """The output resolution of the SparseFlex: the structure's times the VAE's upsampling."""
        return self.structure.resolution * self.vae.config.upsample_factor

    @torch.no_grad()
    def __call__(self, images: list, seed: int = 0, structure_steps: int = DEFAULT_STEPS,
                 structure_guidance: float = DEFAULT_GUIDANCE, slat_steps: int = DEFAULT_STEPS,
                 slat_guidance: float = DEFAULT_GUIDANCE, shift: float = DEFAULT_SHIFT, chunk_size: int | None = 64,
                 progress: Callable[[str, int, int], None] | None = None) -> list[GenerationResult]:
        """One shape per image (a file or an RGBA / RGB array), reproducible for a given ``seed``. ``progress(stage,
        step, steps)`` is called after every sampling step. Raises :class:`InputError` when an image's generated
        structure is empty."""
        report = (lambda stage: (lambda i, n, *_: progress(stage, i, n))) if progress else (lambda stage: None)
        results = []
        for k, image in enumerate(images):
            times = {}
            t0 = time.perf_counter()
            cond = image_tokens(self.structure.image_encoder, [image])
            times["image encoder"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            s = self.structure.sample(cond, seed=seed, steps=structure_steps, guidance=structure_guidance,
                                      shift=shift, callback=report("structure"))[0]
            times["structure"] = time.perf_counter() - t0
            if len(s.coords) == 0:
                name = image if isinstance(image, (str, os.PathLike)) else f"image {k}"
                raise InputError(f"{name}: the generated structure is empty (no voxel scored above 0); try another "
                                 f"seed or a higher structure guidance")
            t0 = time.perf_counter()
            latent = self._slat(s.coords, s.resolution, cond, seed, slat_steps, slat_guidance, shift,
                                report("latent"))
            times["latent"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            rec = decode_latent(self.vae, latent, chunk_size)
            times["decode"] = time.perf_counter() - t0
            results.append(GenerationResult(rec.mesh, rec.sparseflex, s.coords, latent, times))
        return results

    def _slat(self, coords: torch.Tensor, resolution: int, cond: torch.Tensor, seed: int, steps: int,
              guidance: float, shift: float, callback) -> Latent:
        from ..data.latents import denormalize_latent
        device = cond.device
        coords = coords.to(device)
        c = self.slat_flow.config.in_channels
        # the second stage's noise from its own generator, so the structure stage's steps do not shift it
        gen = torch.Generator().manual_seed(int(seed) + 1)
        noise = SparseTensor(torch.cat([coords.new_zeros(len(coords), 1), coords], 1),
                             gaussian_noise((len(coords), c), gen, device), 1)
        velocity = guided_velocity(self.slat_flow, cond, torch.zeros_like(cond), guidance)
        z = euler_sample(velocity, noise, steps, shift, callback)
        return Latent(coords.cpu(), denormalize_latent(z.feats, self.stats).cpu(), resolution)

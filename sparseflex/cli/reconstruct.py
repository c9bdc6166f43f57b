"""`sparseflex reconstruct | encode | decode`: run a trained SparseFlex VAE (a TripoSF release file or our checkpoint).

    sparseflex reconstruct INPUT -o OUT.ply --checkpoint CKPT [--config NAME] [--resolution R] [--points P]
                           [--sample] [--prune | --no-prune] [--chunking whole|release] [--precision fp32|fp16]
    sparseflex encode INPUT -o LATENT.safetensors --checkpoint CKPT [--sample]
    sparseflex decode LATENT -o OUT.ply --checkpoint CKPT [--prune | --no-prune] [--chunking whole|release]

The TripoSF release's own output: `--sample --chunking release` (pruning is already off for its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import time

from ..errors import OptionError, check_range
from .common import add_overwrite, check_device, device_option, metrics_points, output_path, positive_int, seed_option


def register(sub) -> None:
    p = sub.add_parser("reconstruct", help="encode and decode a mesh with a trained VAE, with metrics",
                       description="Encode a mesh to the VAE latent, decode it (chunked), write the mesh and print "
                                   "metrics against the input.")
    _mesh_input(p)
    p.add_argument("-o", "--output", required=True, help="output mesh (.ply, .obj or .glb), in the input's coordinates")
    _model_options(p)
    _decode_options(p)
    p.add_argument("--no-metrics", action="store_true", help="skip the metrics against the input")
    p.add_argument("--metrics-points", type=metrics_points, default=300_000,
                   help="samples per mesh for the metrics against the input (default 300,000)")
    add_overwrite(p)
    p.set_defaults(func=run_reconstruct)

    p = sub.add_parser("encode", help="encode a mesh to a VAE latent (.safetensors)",
                       description="Encode a mesh to the VAE's sparse 8-channel latent (the posterior mean).")
    _mesh_input(p)
    p.add_argument("-o", "--output", required=True, help="latent file (.safetensors)")
    _model_options(p)
    add_overwrite(p)
    p.set_defaults(func=run_encode)

    p = sub.add_parser("decode", help="decode a VAE latent to a mesh",
                       description="Decode a latent written by `sparseflex encode` to a mesh.")
    p.add_argument("input", help="latent file written by `sparseflex encode`")
    p.add_argument("-o", "--output", required=True, help="output mesh (.ply, .obj or .glb)")
    p.add_argument("--checkpoint", required=True, help="VAE weights: TripoSF .safetensors or a training checkpoint")
    p.add_argument("--config", default=None,
                   help="model config when the file names none: triposf (default), small, tiny, or a JSON file of "
                        "VAEConfig fields")
    p.add_argument("--device", type=device_option, default=None,
                   help="torch device (default: cuda when available, else cpu)")
    _precision_option(p)
    _decode_options(p)
    add_overwrite(p)
    p.set_defaults(func=run_decode)


def _mesh_input(p) -> None:
    p.add_argument("input", help="mesh file (OBJ, PLY, STL, OFF, GLB/GLTF)")


def _model_options(p) -> None:
    p.add_argument("--checkpoint", required=True, help="VAE weights: TripoSF .safetensors or a training checkpoint")
    p.add_argument("--config", default=None,
                   help="model config when the file names none: triposf (default), small, tiny, or a JSON file of "
                        "VAEConfig fields")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="OUTPUT resolution, the latent's times the upsampling factor (default: the config's)")
    p.add_argument("--points", type=positive_int, default=None,
                   help="surface samples fed to the encoder (default: 819,200 at latent 256, scaled by area)")
    p.add_argument("--seed", type=seed_option, default=0,
                   help="seed of the surface samples and of --sample (default 0)")
    p.add_argument("--sample", action="store_true",
                   help="decode a posterior sample mean + exp(logvar / 2) * eps, as the TripoSF release does "
                        "(default: the posterior mean)")
    p.add_argument("--device", type=device_option, default=None,
                   help="torch device (default: cuda when available, else cpu)")
    _precision_option(p)


# the library's CHUNKINGS and PRECISIONS (sparseflex.models.vae, sparseflex.pipelines.reconstruct), spelled out so
# that parsing options imports no torch
CHUNKINGS = ("whole", "release")
PRECISIONS = ("fp32", "fp16")


def _decode_options(p) -> None:
    p.add_argument("--chunk-size", type=positive_int, default=64,
                   help="latent voxels per axis upsampled at a time with --chunking whole, bounding memory without "
                        "changing the result (default 64)")
    p.add_argument("--prune", action=argparse.BooleanOptionalAction, default=None,
                   help="drop the children the pruning head scores below 0 (default: the checkpoint's setting; off "
                        "for the TripoSF release, which keeps every child)")
    p.add_argument("--chunking", choices=CHUNKINGS, default="whole",
                   help="whole: GroupNorm statistics over the whole shape, as in training (default); release: the "
                        "TripoSF release's 4^3 / 8^3 padded chunks with per-chunk statistics, to reproduce its output")


def _precision_option(p) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default) or fp16 autocast on CUDA, as the release runs (faster, less memory)")


def _load(args):
    import torch

    from ..models import load_model, read_config
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    config = read_config(args.config) if args.config else None
    return load_model(args.checkpoint, config=config, device=device)


def _latent_resolution(args, model) -> int:
    factor = model.config.upsample_factor
    if args.resolution is None:
        return model.config.latent_resolution
    if args.resolution % factor:
        raise OptionError(f"--resolution must be a multiple of the model's upsampling factor {factor}; "
                          f"got {args.resolution}")
    check_range("--resolution", args.resolution, 2 * factor, 4096)
    return args.resolution // factor


def _mesh_output(args):
    from ..data.mesh import SAVE_FORMATS
    return output_path(args.output, args.overwrite, SAVE_FORMATS)


def _report(start, result, out) -> dict:
    return {"output": str(out), "resolution": result.sparseflex.resolution, "voxels": result.sparseflex.num_voxels,
            "vertices": len(result.mesh.vertices), "faces": len(result.mesh.faces),
            "seconds": round(time.perf_counter() - start, 2)}


def run_reconstruct(args) -> int:
    from ..data.mesh import load_mesh, save_mesh
    from ..pipelines.reconstruct import reconstruct

    out = _mesh_output(args)
    start = time.perf_counter()
    mesh = load_mesh(args.input)
    model = _load(args)
    result = reconstruct(model, mesh, num_points=args.points, seed=args.seed,
                         resolution=_latent_resolution(args, model), chunk_size=args.chunk_size,
                         metrics=not args.no_metrics, metrics_points=args.metrics_points, prune=args.prune,
                         chunking=args.chunking, sample=args.sample, precision=args.precision)
    save_mesh(out, result.mesh)
    report = _report(start, result, out)
    if result.metrics is not None:
        report["metrics"] = result.metrics
    print(json.dumps(report, indent=2))
    return 0


def run_encode(args) -> int:
    from ..data.mesh import load_mesh
    from ..pipelines.reconstruct import encode_mesh, save_latent

    out = output_path(args.output, args.overwrite, (".safetensors",))
    start = time.perf_counter()
    mesh = load_mesh(args.input)
    model = _load(args)
    latent = encode_mesh(model, mesh, num_points=args.points, seed=args.seed,
                         resolution=_latent_resolution(args, model), sample=args.sample, precision=args.precision)
    save_latent(out, latent)
    print(json.dumps({"output": str(out), "latent_resolution": latent.resolution, "voxels": len(latent.coords),
                      "channels": latent.feats.shape[1], "seconds": round(time.perf_counter() - start, 2)}, indent=2))
    return 0


def run_decode(args) -> int:
    from ..data.mesh import save_mesh
    from ..pipelines.reconstruct import decode_latent, load_latent

    out = _mesh_output(args)
    start = time.perf_counter()
    latent = load_latent(args.input)
    model = _load(args)
    result = decode_latent(model, latent, chunk_size=args.chunk_size, prune=args.prune, chunking=args.chunking,
                           precision=args.precision)
    save_mesh(out, result.mesh)
    print(json.dumps(_report(start, result, out), indent=2))
    return 0

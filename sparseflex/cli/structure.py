"""`sparseflex sample-structure IMAGE -o OUT.ply --checkpoint FLOW`: generate the sparse voxel structure of an image.

Writes the occupied voxels as a mesh of cubes (OUT.ply, .obj or .glb, in the unit cube [-0.5, 0.5]^3) and OUT.png beside
it (the preprocessed input and normal renders of the cubes from 4 views).
"""

from __future__ import annotations

import json
import sys
import time

from ..errors import InputError
from .common import add_overwrite, device_option, number, output_path, seed_option


def register(sub) -> None:
    p = sub.add_parser("sample-structure", help="generate the voxel structure of an image (image-to-3D, stage 1)",
                       description=__doc__)
    p.add_argument("image", help="RGBA image with a transparent background, or RGB on a plain background "
                                 "(PNG, JPEG, WebP)")
    p.add_argument("-o", "--output", required=True, help="output mesh of the voxels (.ply, .obj or .glb)")
    p.add_argument("--checkpoint", required=True, help="structure flow checkpoint (sparseflex train structure-flow)")
    p.add_argument("--structure-vae", default=None,
                   help="structure VAE checkpoint (default: the one the flow was trained with)")
    p.add_argument("--image-encoder", default=None,
                   help="image encoder preset or local weights (default: the one the flow was trained with)")
    p.add_argument("--steps", type=number(int, 1, 10_000), default=50, help="Euler steps (default 50)")
    p.add_argument("--guidance", type=number(float, 0, 100), default=3.5,
                   help="classifier-free guidance g in v_u + g (v_c - v_u) (default 3.5; TRELLIS' cfg_strength w "
                        "is g = 1 + w)")
    p.add_argument("--shift", type=number(float, 0, 100, low_open=True), default=3.0,
                   help="time shift s of the step grid, t' = s t / (1 + (s - 1) t) (default 3)")
    p.add_argument("--seed", type=seed_option, default=0)
    p.add_argument("--device", type=device_option, default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from ..data.images import preprocess_image
    from ..data.mesh import SAVE_FORMATS, save_mesh
    from ..data.voxelize import voxel_mesh
    from ..pipelines.structure import StructurePipeline
    from ..render.images import input_and_views

    out = output_path(args.output, args.overwrite, SAVE_FORMATS)
    picture = output_path(out.with_suffix(".png"), args.overwrite, (".png",))
    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    image = preprocess_image(args.image)  # a bad image fails before any model is loaded
    pipe = StructurePipeline.from_checkpoint(args.checkpoint, args.structure_vae, args.image_encoder, device)
    with tqdm(total=args.steps, disable=args.quiet, unit="step", desc="structure flow", file=sys.stderr) as bar:
        result = pipe([args.image], seed=args.seed, steps=args.steps, guidance=args.guidance, shift=args.shift,
                      callback=lambda *_: bar.update(1))[0]
    if len(result.coords) == 0:
        raise InputError("the generated structure is empty (no voxel scored above 0); try another --seed or a "
                         "higher --guidance")
    mesh = voxel_mesh(result.coords.cpu(), result.resolution)
    save_mesh(out, mesh)
    input_and_views(image, {"structure": mesh}, picture)
    print(json.dumps({"output": str(out), "picture": str(picture), "resolution": result.resolution,
                      "voxels": len(result.coords), "seconds": round(time.perf_counter() - start, 2)}, indent=2))
    return 0

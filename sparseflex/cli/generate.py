"""`sparseflex generate IMAGE [IMAGE ...] -o OUT_DIR --checkpoint PIPELINE.json`: image-to-3D.

Per image NAME: NAME.glb and NAME.ply (the mesh in the unit cube [-0.5, 0.5]^3), NAME.png (the preprocessed input
beside normal renders from 4 views); report.json holds the settings and the seconds of each stage. The pipeline file
names the five parts (`sparseflex pipeline save`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import OptionError
from .common import add_overwrite, device_option, new_dir, number, output_dir, seed_option

STAGES = ("structure", "latent")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate 3D meshes from images (structure flow + SLat flow + VAE)",
                       description=__doc__)
    p.add_argument("images", nargs="+", help="RGBA images with a transparent background, or RGB on a plain "
                                             "background (PNG, JPEG, WebP)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--checkpoint", required=True, help="pipeline file (sparseflex pipeline save)")
    p.add_argument("--seed", type=seed_option, default=0)
    p.add_argument("--steps", type=number(int, 1, 10_000), default=50, help="Euler steps of each stage (default 50)")
    p.add_argument("--structure-steps", type=number(int, 1, 10_000), help="Euler steps of the structure stage")
    p.add_argument("--latent-steps", type=number(int, 1, 10_000), help="Euler steps of the latent stage")
    p.add_argument("--guidance", type=number(float, 0, 100), default=3.5,
                   help="classifier-free guidance g of each stage, v_u + g (v_c - v_u) (default 3.5)")
    p.add_argument("--structure-guidance", type=number(float, 0, 100), help="guidance of the structure stage")
    p.add_argument("--latent-guidance", type=number(float, 0, 100), help="guidance of the latent stage")
    p.add_argument("--shift", type=number(float, 0, 100, low_open=True), default=3.0,
                   help="time shift of the step grids (default 3)")
    p.add_argument("--chunk-size", type=number(int, 2, 4096), default=64,
                   help="latent voxels per axis the VAE decoder upsamples at a time (memory; default 64)")
    p.add_argument("--device", type=device_option, default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_overwrite(p)
    p.set_defaults(func=run)

    p = sub.add_parser("pipeline", help="write a pipeline file naming the parts of the image-to-3D generator",
                       description="Write a pipeline file (JSON) for `sparseflex generate`.")
    ps = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    save = ps.add_parser("save", help="write a pipeline file from trained runs",
                         description="Name the five parts of the generator in one file. The structure VAE, the VAE "
                                     "and the image encoder default to those the flows were trained with.")
    save.add_argument("-o", "--output", required=True, help="pipeline file (JSON)")
    save.add_argument("--structure-flow", required=True, help="structure flow checkpoint")
    save.add_argument("--slat-flow", required=True, help="SLat flow checkpoint")
    save.add_argument("--structure-vae", help="structure VAE checkpoint")
    save.add_argument("--vae", help="SparseFlex VAE checkpoint (or the TripoSF release file)")
    save.add_argument("--image-encoder", help="image encoder preset or local weights")
    add_overwrite(save)
    save.set_defaults(func=run_save)


def _names(images: list[str]) -> list[str]:
    """Output names from the images' file names, made unique."""
    seen: dict[str, int] = {}
    names = []
    for image in images:
        stem = Path(image).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from ..data.images import preprocess_image
    from ..data.mesh import save_mesh
    from ..io import write_atomic
    from ..pipelines.generate import ImageTo3DPipeline
    from ..render.images import input_and_views

    out = output_dir(args.output)
    names = _names(args.images)
    if not args.overwrite and out.exists():
        clash = [out / f"{n}{ext}" for n in names for ext in (".glb", ".ply", ".png")] + [out / "report.json"]
        clash = [p for p in clash if p.exists()]
        if clash:
            raise OptionError(f"{clash[0]} exists; pass --overwrite to replace it")
    inputs = [preprocess_image(image) for image in args.images]  # bad images fail before any model is loaded
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    pipe = ImageTo3DPipeline.from_file(args.checkpoint, device)
    load_s = time.perf_counter() - start
    steps = {"structure": args.structure_steps or args.steps, "latent": args.latent_steps or args.steps}
    guidance = {"structure": args.structure_guidance if args.structure_guidance is not None else args.guidance,
                "latent": args.latent_guidance if args.latent_guidance is not None else args.guidance}
    report = {"pipeline": str(args.checkpoint), "seed": args.seed, "steps": steps, "guidance": guidance,
              "shift": args.shift, "device": str(device), "resolution": pipe.resolution,
              "load_seconds": round(load_s, 2), "shapes": []}
    with new_dir(out):
        for image, name, picture in zip(args.images, names, inputs):
            bars = {s: tqdm(total=steps[s], desc=f"{name}: {s}", unit="step", disable=args.quiet, file=sys.stderr,
                            leave=False) for s in STAGES}
            result = pipe([image], seed=args.seed, structure_steps=steps["structure"],
                          structure_guidance=guidance["structure"], slat_steps=steps["latent"],
                          slat_guidance=guidance["latent"], shift=args.shift, chunk_size=args.chunk_size,
                          progress=lambda stage, i, n: bars[stage].update(1))[0]
            for bar in bars.values():
                bar.close()
            t0 = time.perf_counter()
            paths = {ext: save_mesh(out / f"{name}{ext}", result.mesh) for ext in (".glb", ".ply")}
            input_and_views(picture, {"generated": result.mesh}, out / f"{name}.png")
            result.seconds["write"] = time.perf_counter() - t0
            report["shapes"].append({"image": str(image), "mesh": str(paths[".glb"]), "ply": str(paths[".ply"]),
                                     "picture": str(out / f"{name}.png"), "structure_voxels": len(result.structure),
                                     "voxels": result.sparseflex.num_voxels, "faces": len(result.mesh.faces),
                                     "seconds": {k: round(v, 3) for k, v in result.seconds.items()}})
        write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    print(json.dumps(report, indent=2))
    return 0


def run_save(args) -> int:
    from ..pipelines.generate import save_pipeline
    from .common import output_path
    out = output_path(args.output, args.overwrite)
    doc = save_pipeline(out, args.structure_flow, args.slat_flow, args.structure_vae, args.vae, args.image_encoder)
    print(json.dumps({"output": str(out), **doc}, indent=2))
    return 0

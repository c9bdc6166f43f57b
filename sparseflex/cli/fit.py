"""`sparseflex fit INPUT -o OUTDIR`: reconstruct any mesh as a high-resolution SparseFlex by rendering losses alone."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .common import device_option, metrics_points, number, new_dir, run_folder, seed_option


def register(sub) -> None:
    p = sub.add_parser("fit", help="fit a SparseFlex to a mesh with frustum-aware sectional rendering losses",
                       description=__doc__)
    p.add_argument("input", help="mesh file (OBJ, PLY, STL, OFF, GLB/GLTF)")
    p.add_argument("-o", "--output", required=True, help="output folder (mesh.ply, metrics.json, pictures, checkpoint)")
    p.add_argument("--resolution", type=number(int, 8, 2048), default=256,
                   help="final resolution, a power of two (8..2048, default 256)")
    p.add_argument("--start-resolution", type=number(int, 0, 2048), default=0,
                   help="first stage's resolution for coarse-to-fine fitting, a power of two "
                        "(default 0: the final resolution, one stage)")
    p.add_argument("--visibility-ratio", type=number(float, 0, 1), default=0.0,
                   help="fraction of voxels each step extracts and renders, 0..1 "
                        "(default 0: automatic, 1 up to 256, 0.3 at 512, 0.1 at 1024)")
    p.add_argument("--iterations", type=number(int, 0, 10_000_000), default=600,
                   help="optimisation steps over all stages (default 600)")
    p.add_argument("--image-size", type=number(int, 0, 4096), default=0,
                   help="rendered image size in pixels, 16..4096 "
                        "(default 0: automatic, 256 up to resolution 512, 512 at 1024)")
    p.add_argument("--moments", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the optimiser's moments: bfloat16 halves their memory (about 100 bytes per voxel "
                        "less) at a small cost in accuracy; see docs/benchmarks.md (default float32)")
    p.add_argument("--checkpoint-every", type=number(int, 0), default=100,
                   help="save OUTDIR/checkpoint.pt every this many steps (0: only at the end; default 100)")
    p.add_argument("--device", type=device_option, default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--seed", type=seed_option, default=0)
    p.add_argument("--metrics-points", type=metrics_points, default=300_000,
                   help="samples per mesh for the metrics against the input (1,000..20,000,000, default 300,000)")
    p.add_argument("--resume", action="store_true", help="continue the fit saved in OUTDIR/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start again even if OUTDIR holds a previous fit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.mesh import load_mesh, normalize
    from ..fit.fitter import FitConfig, load_checkpoint

    # everything the user gave is checked before anything is created
    out = Path(args.output)
    ckpt = run_folder(out, args.resume, args.overwrite, "fit")
    if args.resume:
        state, config = load_checkpoint(ckpt, args.device)
        if args.iterations != config.iterations and args.iterations > state.step:
            config.iterations = args.iterations  # allow extending a finished or interrupted run
    else:
        state = None
        config = FitConfig(resolution=args.resolution, start_resolution=args.start_resolution,
                           iterations=args.iterations, visibility_ratio=args.visibility_ratio,
                           image_size=args.image_size, seed=args.seed, checkpoint_every=args.checkpoint_every,
                           moment_dtype=args.moments)
    start = time.perf_counter()
    mesh = load_mesh(args.input)
    normed, transform = normalize(mesh)
    normed = normed.to(args.device)
    with new_dir(out, keep=("checkpoint.pt",)):  # a new fit failing before its first checkpoint leaves nothing
        return _fit(args, out, ckpt, config, state, mesh, normed, transform, start)


def _fit(args, out, ckpt, config, state, mesh, normed, transform, start) -> int:
    import torch
    from tqdm import tqdm

    from ..data.mesh import Mesh, save_mesh
    from ..eval.metrics import mesh_metrics
    from ..eval.resources import peak_memory_bytes
    from ..eval.topology import topology_report, topology_warning
    from ..fit.fitter import Fitter, save_checkpoint
    from ..fit.report import comparison_image, loss_curve
    from ..io import write_atomic

    fitter = Fitter(normed, config, state)

    bar = tqdm(total=config.iterations, initial=fitter.state.step, disable=args.quiet, unit="step",
               dynamic_ncols=True, file=sys.stderr)

    def progress(st, loss):
        bar.update(1)
        bar.set_postfix_str(f"R={st.sf.resolution} voxels={st.sf.num_voxels} loss={loss:.4f}")

    try:
        sf = fitter.run(progress=progress, on_checkpoint=lambda st: save_checkpoint(ckpt, st, config))
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(ckpt, fitter.snapshot(), config)
        print(f"interrupted at step {fitter.state.step}; resume with: sparseflex fit {args.input} -o {out} --resume",
              file=sys.stderr)
        return 130
    bar.close()
    save_checkpoint(ckpt, fitter.snapshot(), config)
    # past the checkpoint the optimiser's moments and the samples are dead weight: free them before the full
    # extraction, the largest allocation of the run at high resolution (issue 20)
    fitter.optimizer = fitter.state.optimizer_state = None
    fitter.sampler = fitter.points = fitter.normals = None

    with torch.no_grad():
        ex = sf.extract()
    fitted_normed = Mesh(ex.vertices.detach(), ex.faces)
    resolution, voxels = sf.resolution, sf.num_voxels
    # the SparseFlex is in the checkpoint: free it (and the extraction's extras) before the metrics and pictures
    del ex, sf
    fitter.state.sf = None
    result = Mesh(transform.invert(fitted_normed.vertices.cpu()), fitted_normed.faces.cpu())
    save_mesh(out / "mesh.ply", result)
    wall = time.perf_counter() - start
    peak = peak_memory_bytes(args.device)  # of the fit and its extraction (the metrics below add their own)
    report = {
        "input": str(args.input), "resolution": resolution, "stages": config.stages(),
        "iterations": config.iterations, "visibility_ratio": config.ratio(resolution),
        "moments": config.moment_dtype,
        "voxels": voxels, "vertices": len(result.vertices), "faces": len(result.faces),
        "wall_seconds": round(wall, 1), "peak_memory_gb": round(peak / 1e9, 2),
        "bytes_per_voxel": round(peak / max(voxels, 1)),  # peak (RSS, or CUDA's peak allocation) / voxels
        "time_seconds": {k: round(v, 1) for k, v in fitter.state.timing.items()},
        "metrics": mesh_metrics(result, mesh, num_points=args.metrics_points, seed=args.seed),
        "topology": topology_report(result, mesh),
    }
    write_atomic(out / "metrics.json", (json.dumps(report, indent=2) + "\n").encode())
    comparison_image(normed.to("cpu"), {"fitted": fitted_normed.to("cpu")}, out / "comparison.png")
    loss_curve(fitter.state.history, out / "loss.png", title=f"sparseflex fit {Path(args.input).name}")
    warning = topology_warning(report["topology"])
    if warning:
        print(warning, file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0

"""VAE training step time and peak memory per model config and latent resolution (one item per step).

    python benchmarks/train_step.py [--configs tiny,small] [--resolutions 16,32] [--mesh PATH] [--steps 3]
                                    [--image-size 128] [--views 2] [--device cpu]

Each (config, resolution) runs in its own process so that its peak memory (CUDA: max allocated; CPU: peak RSS,
which includes the interpreter and torch, about 0.3-0.4 GB) is its own. The item is prepared in memory from the mesh
with ``sparseflex.data.prepare.prepare_item`` (occupancy at 2R and 4R, i.e. output resolution 4R); the first step is
a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MESH = Path(__file__).resolve().parents[2] / "shared/data/meshes/closed/ajc_spot.obj"


def one(args) -> dict:
    import torch

    from sparseflex.data.item import load_item, save_item
    from sparseflex.data.prepare import PrepareConfig, prepare_item
    from sparseflex.train.config import load_config
    from sparseflex.train.trainer import Trainer
    from sparseflex.train.vae_task import VAETask

    device = torch.device(args.device)
    levels = 2
    prep = PrepareConfig(points=args.points, resolution=args.resolution, levels=levels, views=0)
    arrays, _ = prepare_item(args.mesh, prep, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_item(Path(tmp) / "item.npz", arrays)
        item = {"name": Path(args.mesh).name, **load_item(Path(tmp) / "item.npz")}
        config = load_config(args.config).override([
            f"steps={args.steps + 1}", "checkpoint_every=0", f"image_size={args.image_size}",
            f"views_per_item={args.views}", "batch_size=1", f"visibility_ratio={args.visibility_ratio}",
            f'model_overrides={{"latent_resolution": {args.resolution}}}'])
        trainer = Trainer(VAETask(config), [item], config, Path(tmp) / "run", device=device, quiet=True)
        params = sum(p.numel() for p in trainer.model.parameters())
        from sparseflex.data.dataset import collate
        times = []
        for step in range(args.steps + 1):
            batch = collate([item])
            batch["seeds"] = [step]
            if device.type == "cuda":
                torch.cuda.synchronize()
                if step == 1:
                    torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            trainer.train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    return {"config": args.config, "latent": args.resolution, "output": args.resolution * 4, "params": params,
            "latent_voxels": len(item["coords"]), "output_voxels": len(item["occupancy"][-1]),
            "step_seconds": sum(times) / len(times), "peak_gb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--resolutions", default="16,32")
    ap.add_argument("--mesh", default=str(DEFAULT_MESH))
    ap.add_argument("--points", type=int, default=65_536)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--visibility-ratio", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    print(f"VAE training step ({args.mesh and Path(args.mesh).name}, {args.views} views of {args.image_size}px, "
          f"visibility {args.visibility_ratio}, device {args.device}, {os.environ.get('OMP_NUM_THREADS', 'all')} "
          f"threads)")
    print(f"{'config':<8} {'latent':>6} {'output':>6} {'params':>12} {'lat.vox':>8} {'out.vox':>8} {'s/step':>8} "
          f"{'peak GB':>8}")
    for config in args.configs.split(","):
        for res in (int(r) for r in args.resolutions.split(",")):
            cmd = [sys.executable, __file__, "--one", "--config", config, "--resolution", str(res),
                   "--mesh", args.mesh, "--points", str(args.points), "--steps", str(args.steps),
                   "--image-size", str(args.image_size), "--views", str(args.views),
                   "--visibility-ratio", str(args.visibility_ratio), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{config:<8} {res:>6} failed: {proc.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{r['config']:<8} {r['latent']:>6} {r['output']:>6} {r['params']:>12,} {r['latent_voxels']:>8,} "
                  f"{r['output_voxels']:>8,} {r['step_seconds']:>8.2f} {r['peak_gb']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Throughput of dataset preparation (`sparseflex data prepare`) per worker, and item size, as P and R grow.

    python benchmarks/data_prepare.py [--meshes closed/ajc_spot.obj,...] [--points 16384,65536,262144]
                                      [--resolutions 32,64,128] [--views 4] [--image-size 256]

Each configuration prepares every mesh once in this process with one torch thread (what one worker does), writes
the item file, and prints seconds per mesh, meshes per minute per worker and bytes per item (means over the meshes).
The first row uses the defaults; the others vary P at the default R, then R at the default P.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sparseflex.data.item import save_item
from sparseflex.data.prepare import PrepareConfig, item_seed, prepare_item

ROOT = Path(__file__).resolve().parents[2] / "shared/data/meshes"
MESHES = "closed/ajc_spot.obj,open/dc_tshirt1900.obj,interior/tm_CesiumMilkTruck.glb,closed/ddg_kitten.obj"


def measure(paths: list[Path], config: PrepareConfig, tmp: Path) -> tuple[float, float, dict]:
    seconds, sizes, voxels = [], [], {}
    for path in paths:
        start = time.perf_counter()
        arrays, stats = prepare_item(path, config, item_seed(path.name, 0))
        sizes.append(save_item(tmp / f"{path.name}.npz", arrays))
        seconds.append(time.perf_counter() - start)
        for res, count in stats["voxels"].items():
            voxels[res] = voxels.get(res, 0) + count / len(paths)
    return sum(seconds) / len(seconds), sum(sizes) / len(sizes), voxels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--meshes", default=MESHES, help="comma-separated paths under --root")
    ap.add_argument("--points", default="16384,65536,262144")
    ap.add_argument("--resolutions", default="32,64,128")
    ap.add_argument("--views", type=int, default=PrepareConfig.views)
    ap.add_argument("--image-size", type=int, default=PrepareConfig.image_size)
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = [Path(args.root) / m for m in args.meshes.split(",")]
    base = PrepareConfig(views=args.views, image_size=args.image_size)
    configs = [base] + [PrepareConfig(points=int(p), views=args.views, image_size=args.image_size)
                        for p in args.points.split(",") if int(p) != base.points]
    configs += [PrepareConfig(resolution=int(r), views=args.views, image_size=args.image_size)
                for r in args.resolutions.split(",") if int(r) != base.resolution]
    print(f"{len(paths)} meshes ({', '.join(p.name for p in paths)}), one worker (1 torch thread), "
          f"{args.views} views of {args.image_size} px, levels {base.levels}")
    print(f"{'points':>9} {'R':>5} {'s/mesh':>8} {'meshes/min/worker':>18} {'bytes/item':>12}  mean voxels per level")
    with tempfile.TemporaryDirectory() as tmp:
        measure(paths[:1], PrepareConfig(points=1024, resolution=16, views=1, image_size=32), Path(tmp))  # warm-up
        for config in configs:
            sec, size, voxels = measure(paths, config, Path(tmp))
            levels = "  ".join(f"{r}^3: {v:,.0f}" for r, v in voxels.items())
            print(f"{config.points:>9,} {config.resolution:>5} {sec:>8.2f} {60 / sec:>18.1f} {size:>12,.0f}  {levels}",
                  flush=True)


if __name__ == "__main__":
    main()

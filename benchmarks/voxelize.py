"""Exact voxelisation time and voxel count at growing resolutions on a shared mesh.

    python benchmarks/voxelize.py [--mesh closed/ddg_gargoyle.obj] [--resolutions 64,128,256,512] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sparseflex.data.mesh import load_mesh, normalize
from sparseflex.data.voxelize import voxelize

ROOT = Path(__file__).resolve().parents[2] / "shared/data/meshes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--mesh", default="closed/ddg_gargoyle.obj")
    ap.add_argument("--resolutions", default="64,128,256,512")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mesh, _ = normalize(load_mesh(Path(args.root) / args.mesh))
    voxelize(mesh, 16)  # warm-up
    print(f"{args.mesh}: {mesh.num_faces:,} triangles, {args.threads} torch thread(s), best of {args.repeat}")
    print(f"{'R':>6} {'voxels':>12} {'seconds':>9} {'voxels/s':>12}")
    for r in (int(x) for x in args.resolutions.split(",")):
        best, count = float("inf"), 0
        for _ in range(args.repeat):
            start = time.perf_counter()
            count = len(voxelize(mesh, r))
            best = min(best, time.perf_counter() - start)
        print(f"{r:>6} {count:>12,} {best:>9.3f} {count / best:>12,.0f}", flush=True)


if __name__ == "__main__":
    main()

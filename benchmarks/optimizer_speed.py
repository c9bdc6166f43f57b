"""Seconds per fit step, the sectional optimiser against torch.optim.Adam over full-size tensors, in one process.

    python benchmarks/optimizer_speed.py [--resolution 512] [--ratio 0.1] [--steps 12]

Both fit the same generated torus (radii 0.3 and 0.1) from the same `convert`, same cameras; the first two steps
are left out of the mean. Prints the mean seconds per step and the parts the fitter times (sectioning and the
sectional optimiser's gather under ``other``; the optimiser's step under ``backward``) and the ratio. Run it alone
on the machine: a second torch job on 2 cores skews the times.
"""

from __future__ import annotations

import argparse
import time

import torch
import trimesh

from sparseflex.data.mesh import Mesh, normalize
from sparseflex.fit.fitter import FitConfig, Fitter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.1, help="visibility ratio")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t = trimesh.creation.torus(0.3, 0.1, major_sections=128, minor_sections=64)
    gt = normalize(Mesh(torch.tensor(t.vertices, dtype=torch.float32), torch.tensor(t.faces)))[0]
    mean = {}
    for optimizer in ("sectional", "adam"):
        fitter = Fitter(gt, FitConfig(resolution=args.resolution, iterations=args.steps, checkpoint_every=0,
                                      visibility_ratio=args.ratio, optimizer=optimizer))
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fitter.step()
            fitter.state.step += 1
            times.append(time.perf_counter() - t0)
        mean[optimizer] = sum(times[2:]) / max(len(times) - 2, 1)
        parts = ", ".join(f"{k} {v / args.steps:.3f}" for k, v in fitter.state.timing.items())
        print(f"{optimizer:9s} {fitter.state.sf.num_voxels:,} voxels: {mean[optimizer]:.3f} s/step ({parts})")
    print(f"sectional / full-size: {mean['sectional'] / mean['adam']:.2f}")


if __name__ == "__main__":
    main()

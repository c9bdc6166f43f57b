"""Frustum sectioning per view: adaptive near/far planes by bucketed order statistics against a full depth sort.

    python benchmarks/sectioning.py [--voxels 250000,1000000,4000000] [--ratio 0.3] [--repeats 5]

Voxel centres of a thick spherical shell at 1024^3; one random outside view. Prints, per size, the time of the whole
``section()`` call, of its order-statistics part (``_Ranked`` plus the rank queries the planes make), and of the
baseline it replaced (``torch.sort`` of the same side-plane depths), measured in the same run on one thread.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparseflex.render import random_views, section
from sparseflex.render.frustum import _Ranked, _side_depths


def shell(n: int, resolution: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(n, 3, generator=g)
    d = d / d.norm(dim=1, keepdim=True) * (0.3 + 0.02 * torch.rand(n, 1, generator=g))
    return (torch.floor((d + 0.5) * resolution) + 0.5) / resolution - 0.5


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", default="250000,1000000,4000000")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cam = random_views(1, torch.Generator().manual_seed(1))
    print(f"{'voxels':>9} {'side pts':>9} {'section s':>10} {'ranks s':>9} {'sort s':>9} {'sort/ranks':>10}")
    for n in (int(v) for v in args.voxels.split(",")):
        pts = shell(n)
        z = _side_depths(pts, cam, 0, 1e-3).values
        m, k = len(z), int(args.ratio * len(z))

        def ranks():
            r = _Ranked(z)
            for i in (k // 3, k // 3 + 1, k // 3 + k, k // 3 + k + 1):  # the planes' neighbouring ranks
                r[i]

        t_section = best(lambda: section(pts, cam, args.ratio, offset=0.5, margin=1e-3), args.repeats)
        t_ranks = best(ranks, args.repeats)
        t_sort = best(lambda: torch.sort(z), args.repeats)
        print(f"{n:>9,} {m:>9,} {t_section:>10.4f} {t_ranks:>9.4f} {t_sort:>9.4f} {t_sort / t_ranks:>9.1f}x")


if __name__ == "__main__":
    main()

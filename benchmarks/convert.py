"""`sparseflex convert` (voxelise + oriented-point SDF + extract, no optimisation) on the shared meshes, per group.

    python benchmarks/convert.py [--resolution 256] [--groups closed,open,interior] [--points 300000]

Prints CD (x10^4), F-score@0.001, F-score@0.01 and normal consistency against the input (point-to-surface protocol,
README), with voxel and face counts, time, and the per-group means.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sparseflex.data.mesh import Mesh, load_mesh, normalize
from sparseflex.eval.metrics import mesh_metrics
from sparseflex.fit.convert import mesh_to_sparseflex

ROOT = Path(__file__).resolve().parents[2] / "shared/data/meshes"
KEYS = ("chamfer", "fscore@0.001", "fscore@0.01", "normal_consistency")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--groups", default="closed,open,interior")
    ap.add_argument("--points", type=int, default=300_000)
    args = ap.parse_args()
    print(f"convert at {args.resolution}^3, metrics with {args.points:,} points per mesh (point-to-surface)")
    print(f"{'group':<9} {'mesh':<28} {'voxels':>10} {'faces':>10} {'sec':>6} {'CD':>8} {'F@.001':>7} {'F@.01':>7} "
          f"{'NC':>6}")
    for group in args.groups.split(","):
        rows = []
        for path in sorted(p for p in (Path(args.root) / group).iterdir() if p.suffix.lower() != ".tsv"):
            mesh = load_mesh(path)
            normed, _ = normalize(mesh)
            t0 = time.perf_counter()
            sf = mesh_to_sparseflex(normed, args.resolution)
            ex = sf.extract()
            sec = time.perf_counter() - t0
            m = mesh_metrics(Mesh(ex.vertices, ex.faces), normed, num_points=args.points, ceiling=False)
            rows.append(m)
            print(f"{group:<9} {path.name[:28]:<28} {sf.num_voxels:>10,} {len(ex.faces):>10,} {sec:>6.1f} "
                  f"{m['chamfer']:>8.4f} {m['fscore@0.001']:>7.2f} {m['fscore@0.01']:>7.2f} "
                  f"{m['normal_consistency']:>6.3f}", flush=True)
        if rows:
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in KEYS}
            print(f"{group:<9} {'MEAN (' + str(len(rows)) + ' meshes)':<28} {'':>10} {'':>10} {'':>6} "
                  f"{mean['chamfer']:>8.4f} {mean['fscore@0.001']:>7.2f} {mean['fscore@0.01']:>7.2f} "
                  f"{mean['normal_consistency']:>6.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Sparse vs dense FlexiCubes extraction: forward + backward time and peak memory on a real mesh.

Every configuration is built in one process and extracted in another, so the peak resident memory (VmHWM) printed
is the extraction's own (forward + backward, plus the corner lattice and the Python/torch baseline of ~0.3 GB). Dense FlexiCubes is
the same extraction code with every voxel of the R^3 grid active; the sparse one holds the surface band that
`sparseflex convert` builds. Both use the same corner SDF (nearest oriented surface sample), so they extract the
same surface.

    python benchmarks/extraction.py [--mesh PATH] [--dense 64,128,256] [--sparse 64,128,256,512,1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sparseflex.eval.resources import peak_memory_bytes

DEFAULT_MESH = Path(__file__).resolve().parents[2] / "shared/data/meshes/closed/ddg_kitten.obj"


def build(mesh_path: str, resolution: int, mode: str, path: str) -> dict:
    """Build the SparseFlex (in its own process, so its memory does not count against extraction) and save it."""
    import torch

    from sparseflex.data.mesh import load_mesh, normalize
    from sparseflex.fit.baselines import densify
    from sparseflex.fit.convert import mesh_to_sparseflex

    mesh, _ = normalize(load_mesh(mesh_path))
    t0 = time.perf_counter()
    sf = mesh_to_sparseflex(mesh, resolution)
    if mode == "dense":
        sf = densify(sf)
    torch.save({"coords": sf.coords, "resolution": sf.resolution, "sdf": sf.sdf.detach()}, path)
    return {"build_s": round(time.perf_counter() - t0, 2)}


def measure(path: str) -> dict:
    """Forward + backward of the training extraction; the process's peak memory is the extraction's."""
    import torch

    from sparseflex.flexicubes.representation import SparseFlex
    from sparseflex.sparse.coords import corner_lattice

    d = torch.load(path, weights_only=True)  # tensors and plain values only: nothing in the file runs
    t0 = time.perf_counter()
    corners, voxel_corners = corner_lattice(d["coords"])
    n, nc = len(d["coords"]), len(corners)
    zeros = torch.zeros
    sf = SparseFlex(d["coords"], d["resolution"], corners, voxel_corners, d["sdf"], zeros(nc, 3), zeros(n, 8),
                    zeros(n, 12), zeros(n))
    for name in ("sdf", "deform", "alpha_raw", "beta_raw", "gamma_raw"):
        getattr(sf, name).requires_grad_(True)
    t1 = time.perf_counter()
    ex = sf.extract(training=True)
    t2 = time.perf_counter()
    (ex.vertices.square().sum() + ex.dev_loss).backward()
    t3 = time.perf_counter()
    return {"voxels": n, "faces": len(ex.faces), "lattice_s": round(t1 - t0, 2), "forward_s": round(t2 - t1, 2),
            "backward_s": round(t3 - t2, 2),
            "peak_gb": round(peak_memory_bytes() / 1e9, 2)}


def _child(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"killed (exit {proc.returncode})"])[-1]
        return {"error": tail[:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(mesh: str, resolution: int, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "sf.pt")
        row = {"mode": mode, "resolution": resolution}
        row.update(_child(["build", mesh, str(resolution), mode, path]))
        if "error" not in row:
            row.update(_child(["measure", path]))
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default=str(DEFAULT_MESH))
    ap.add_argument("--dense", default="64,128,256")
    ap.add_argument("--sparse", default="64,128,256,512,1024")
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        what, rest = sys.argv[2], sys.argv[3:]
        out = build(rest[0], int(rest[1]), rest[2], rest[3]) if what == "build" else measure(rest[0])
        print(json.dumps(out))
        return
    args = ap.parse_args()
    rows = {}
    for r in sorted({int(x) for x in args.dense.split(",") + args.sparse.split(",") if x}):
        for mode in ("sparse", "dense"):
            if str(r) in (args.sparse if mode == "sparse" else args.dense).split(","):
                rows[(mode, r)] = run_child(args.mesh, r, mode)
                print(json.dumps(rows[(mode, r)]), file=sys.stderr, flush=True)
    print(f"\nmesh: {args.mesh}")
    print(f"{'R':>5} {'mode':>6} {'voxels':>11} {'faces':>10} {'fwd s':>7} {'bwd s':>7} {'peak GB':>8} "
          f"{'dense/sparse time':>18} {'dense/sparse mem':>17}")
    for (mode, r), row in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0] != "sparse")):
        if "error" in row:
            print(f"{r:>5} {mode:>6}  failed: {row['error']}")
            continue
        ratio_t = ratio_m = ""
        if mode == "dense" and ("sparse", r) in rows and "error" not in rows[("sparse", r)]:
            s = rows[("sparse", r)]
            ratio_t = f"{(row['forward_s'] + row['backward_s']) / max(s['forward_s'] + s['backward_s'], 1e-9):.1f}x"
            ratio_m = f"{row['peak_gb'] / max(s['peak_gb'], 1e-9):.1f}x"
        print(f"{r:>5} {mode:>6} {row['voxels']:>11,} {row['faces']:>10,} {row['forward_s']:>7.2f} "
              f"{row['backward_s']:>7.2f} {row['peak_gb']:>8.2f} {ratio_t:>18} {ratio_m:>17}")


if __name__ == "__main__":
    main()

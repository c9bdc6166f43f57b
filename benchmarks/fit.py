"""`sparseflex fit` against its baselines on the shared meshes, per group, measured by the same code in one run.

    python benchmarks/fit.py --out DIR [--resolution 256] [--iterations 600] [--groups closed,open,interior]
        [--meshes-per-group N] [--baselines convert,udf,sdf,dense] [--skip-fit] [--dense-budget-gb 8] [--points 300000]
        [--verbose] [--per-mesh]
    python benchmarks/fit.py --calibrate 16,32,64     # peak memory of dense FlexiCubes fits (baselines.DENSE_*)

Methods, all on the mesh normalised to [-0.5, 0.5]^3 at resolution R:
  fit      SparseFlex fit (Fitter, coarse to fine up to R);
  convert  the initialisation alone (mesh_to_sparseflex + extract);
  udf      the watertight VAE pipeline (unsigned distance, marching cubes at epsilon = 1/R: a closed double layer);
  sdf      marching cubes on the exact signed distance (watertight meshes only, trimesh's test after merging);
  dense    dense FlexiCubes fitted by the same Fitter, at the largest power of two <= R within --dense-budget-gb.
Each method runs in its own subprocess, so its wall time and peak resident memory (VmHWM, including the ~0.3 GB of
Python + torch) are its own. Metrics (CD x10^4, F-score@0.001 / @0.01 in %, normal consistency; point-to-surface,
README) and the topology after welding (boundary edges, boundary loops against the input's, non-manifold edges) are
computed in this process from the saved meshes; the group tables give means of the metrics and totals of the
topology (--per-mesh adds a row per mesh and method). Writes DIR/results.json (after every mesh), the meshes
(DIR/meshes/GROUP/MESH/METHOD.ply) and, for every open mesh, DIR/MESH_compare.png (normal renders of ground truth,
fit and watertight baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sparseflex.eval.resources import peak_memory_bytes

ROOT = Path(__file__).resolve().parents[2] / "shared/data/meshes"
METHODS = ("fit", "convert", "udf", "sdf", "dense")
LABELS = {"fit": "SparseFlex fit", "convert": "convert", "udf": "watertight UDF", "sdf": "exact SDF MC",
          "dense": "dense FlexiCubes"}
KEYS = ("chamfer", "fscore@0.001", "fscore@0.01", "normal_consistency", "seconds", "peak_gb")


# -- one method in a child process ------------------------------------------------------------------------------------

def run_method(method: str, mesh_path: str, resolution: int, iterations: int, out_path: str, image_size: int) -> dict:
    """Reconstruct the normalised mesh with one method and save it (normalised frame); runs in the child."""
    import torch

    from sparseflex.data.mesh import Mesh, load_mesh, normalize, save_mesh
    from sparseflex.fit import baselines
    from sparseflex.fit.convert import mesh_to_sparseflex
    from sparseflex.fit.fitter import FitConfig, Fitter

    torch.set_grad_enabled(method in ("fit", "dense"))
    gt, _ = normalize(load_mesh(mesh_path))
    t0 = time.perf_counter()
    if method == "fit":
        ex = Fitter(gt, FitConfig(resolution=resolution, iterations=iterations, image_size=image_size)).run().extract()
        pred = Mesh(ex.vertices.detach(), ex.faces)
    elif method == "convert":
        ex = mesh_to_sparseflex(gt, resolution).extract()
        pred = Mesh(ex.vertices, ex.faces)
    elif method == "udf":
        pred = baselines.watertight_udf(gt, resolution)
    elif method == "sdf":
        pred = baselines.exact_sdf_mc(gt, resolution)
    else:
        pred = baselines.dense_flexicubes_fit(gt, resolution, iterations, FitConfig(image_size=image_size))
    seconds = time.perf_counter() - t0
    save_mesh(out_path, pred)
    return {"seconds": round(seconds, 2), "faces": pred.num_faces, "resolution": resolution,
            "peak_gb": round(peak_memory_bytes() / 1e9, 3)}


def child(method: str, mesh_path: Path, resolution: int, iterations: int, out_path: Path, image_size: int,
          timeout: float | None) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(mesh_path), str(resolution), str(iterations),
           str(out_path), str(image_size)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"killed (exit {proc.returncode})"])[-1]
        return {"error": tail[:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the benchmark ----------------------------------------------------------------------------------------------------

def measure_mesh(path: Path, group: str, args, dense_resolution: int) -> dict:
    from sparseflex.data.mesh import load_mesh, normalize
    from sparseflex.eval.metrics import mesh_metrics
    from sparseflex.eval.topology import topology
    from sparseflex.fit.baselines import is_watertight
    from sparseflex.fit.report import comparison_image

    gt, _ = normalize(load_mesh(path))
    watertight = is_watertight(gt)
    out_dir = Path(args.out) / "meshes" / group / path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = topology(gt.vertices, gt.faces)
    record = {"group": group, "mesh": path.name, "watertight": watertight,
              "boundary_loops": reference["boundary_loops"], "methods": {}}
    meshes = {}
    for method in (*(() if args.skip_fit else ("fit",)), *args.baselines):
        if method == "sdf" and not watertight:
            continue
        res = dense_resolution if method == "dense" else args.resolution
        ply = out_dir / f"{method}.ply"
        row = child(method, path, res, args.iterations, ply, args.image_size, args.timeout)
        if "error" not in row:
            pred = load_mesh(ply) if row["faces"] else None
            if pred is not None:
                meshes[method] = pred
                row.update(mesh_metrics(pred, gt, num_points=args.points, ceiling=False))
                topo = topology(pred.vertices, pred.faces)
                row.update({k: topo[k] for k in ("boundary_edges", "boundary_loops", "nonmanifold_edges")})
                row["loops_kept"] = int(topo["boundary_loops"] == reference["boundary_loops"])
            else:
                row.update({k: None for k in ("chamfer", "normal_consistency")},
                           **{"fscore@0.001": 0.0, "fscore@0.01": 0.0})
        record["methods"][method] = row
        if args.verbose:
            print(f"  {group:<9} {path.name[:26]:<26} {_row(LABELS[method], row)}", flush=True)
    if group == "open" and "fit" in meshes:
        shown = {f"{LABELS[m]} {args.resolution}": meshes[m] for m in ("fit", "udf") if m in meshes}
        record["png"] = str(comparison_image(gt, shown, Path(args.out) / f"{path.stem}_compare.png"))
    return record


def _fmt(v, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def _row(label: str, row: dict, count: str = "") -> str:
    if "error" in row:
        return f"{label:<17} failed: {row['error']}"
    return (f"{label:<17} {count:>3} {_fmt(row.get('chamfer'), '.6f', 9)} {_fmt(row.get('fscore@0.001'), '.2f', 7)} "
            f"{_fmt(row.get('fscore@0.01'), '.2f', 7)} {_fmt(row.get('normal_consistency'), '.3f', 6)} "
            f"{_fmt(row.get('seconds'), '.1f', 8)} {_fmt(row.get('peak_gb'), '.2f', 7)} "
            f"{_fmt(row.get('boundary_edges'), 'd', 9)} {_fmt(row.get('nonmanifold_edges'), 'd', 7)} "
            f"{_fmt(row.get('boundary_loops'), 'd', 5)}")


def group_table(group: str, records: list[dict], methods: list[str], resolution: int, dense_resolution: int,
                per_mesh: bool = False) -> None:
    print(f"\n{group} ({len(records)} meshes), resolution {resolution} (dense {dense_resolution})")
    print(f"{'method':<17} {'n':>3} {'CD x1e4':>9} {'F@.001':>7} {'F@.01':>7} {'NC':>6} {'time s':>8} {'peak GB':>7} "
          f"{'bnd edges':>9} {'non-man':>7} {'loops':>5} loops kept")
    loops_in = sum(r["boundary_loops"] for r in records)
    for method in methods:
        rows = [r["methods"][method] for r in records if method in r["methods"]]
        ok = [r for r in rows if "error" not in r]
        if not rows:
            continue
        if not ok:
            print(_row(LABELS[method], rows[0]))
            continue
        mean = {}
        for k in KEYS:
            vals = [r[k] for r in ok if r.get(k) is not None]
            mean[k] = sum(vals) / len(vals) if vals else None
        for k in ("boundary_edges", "nonmanifold_edges", "boundary_loops", "loops_kept"):  # totals over the meshes
            vals = [r[k] for r in ok if r.get(k) is not None]
            mean[k] = sum(vals) if vals else None
        failed = f" ({len(rows) - len(ok)} failed)" if len(ok) < len(rows) else ""
        kept = "" if mean["loops_kept"] is None else f" {mean['loops_kept']}/{len(ok)} (input: {loops_in} loops)"
        print(_row(LABELS[method], mean, str(len(ok))) + kept + failed)
    if per_mesh:
        for r in records:
            for method in methods:
                if method in r["methods"]:
                    label = f"  {r['mesh'][:24]:<24} ({r['boundary_loops']} loops) {LABELS[method]}"
                    print(_row(label[:60], r["methods"][method]))


def write_json(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def calibrate(resolutions: list[int], iterations: int = 3) -> None:
    """Peak memory of dense fits at a few resolutions: the model behind baselines.DENSE_BASE / DENSE_PER_VOXEL."""
    mesh = ROOT / "closed" / "ddg_kitten.obj"
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in resolutions:
            row = child("dense", mesh, r, iterations, Path(tmp) / "m.ply", 256, None)
            points.append(((r + 2) ** 3, row.get("peak_gb")))
            print(f"dense {r:>5}: {row}", flush=True)
    if len(points) >= 2 and all(p[1] for p in points):
        (v0, m0), (v1, m1) = points[-2], points[-1]
        per_voxel = (m1 - m0) * 1e9 / (v1 - v0)
        print(f"bytes per voxel {per_voxel:.0f}, base {(m1 * 1e9 - per_voxel * v1) / 1e9:.2f} GB")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        method, mesh, res, iters, out, size = sys.argv[2:8]
        print(json.dumps(run_method(method, mesh, int(res), int(iters), out, int(size))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--out", help="output directory (results.json, meshes, PNGs)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--groups", default="closed,open,interior")
    ap.add_argument("--meshes-per-group", type=int, default=0, help="0: all")
    ap.add_argument("--baselines", default="convert,udf,sdf,dense")
    ap.add_argument("--skip-fit", action="store_true", help="measure the baselines only")
    ap.add_argument("--dense-budget-gb", type=float, default=8.0)
    ap.add_argument("--points", type=int, default=300_000, help="surface samples per mesh for the metrics")
    ap.add_argument("--image-size", type=int, default=0, help="0: automatic (FitConfig.size)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per method and mesh")
    ap.add_argument("--calibrate", default="", help="comma-separated resolutions: measure dense-fit peak memory")
    ap.add_argument("--verbose", action="store_true", help="per-mesh rows while it runs")
    ap.add_argument("--per-mesh", action="store_true", help="per-mesh rows in the group tables")
    args = ap.parse_args()
    if args.calibrate:
        calibrate([int(r) for r in args.calibrate.split(",")])
        return
    if not args.out:
        ap.error("--out is required")
    args.baselines = [m for m in args.baselines.split(",") if m]
    unknown = sorted(set(args.baselines) - set(METHODS[1:]))
    if unknown:
        ap.error(f"unknown baselines {', '.join(unknown)}; choose from {', '.join(METHODS[1:])}")
    from sparseflex.fit.baselines import largest_dense_resolution

    dense_res = min(args.resolution, largest_dense_resolution(args.dense_budget_gb * 1e9)) \
        if "dense" in args.baselines else 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHODS if (m == "fit" and not args.skip_fit) or m in args.baselines]
    payload = {"resolution": args.resolution, "iterations": args.iterations, "dense_resolution": dense_res,
               "points": args.points, "records": []}
    print(f"fit benchmark at {args.resolution}^3, {args.iterations} iterations, dense FlexiCubes at {dense_res}^3 "
          f"(budget {args.dense_budget_gb:g} GB), metrics with {args.points:,} points (point-to-surface)", flush=True)
    for group in args.groups.split(","):
        group_dir = Path(args.root) / group
        if not group_dir.is_dir():
            print(f"\n{group}: no folder {group_dir}, skipped")
            continue
        paths = sorted(p for p in group_dir.iterdir() if p.suffix.lower() != ".tsv")
        if args.meshes_per_group:
            paths = paths[: args.meshes_per_group]
        records = []
        for path in paths:
            records.append(measure_mesh(path, group, args, dense_res))
            payload["records"].append(records[-1])
            write_json(out / "results.json", payload)
        group_table(group, records, methods, args.resolution, dense_res, args.per_mesh)
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()

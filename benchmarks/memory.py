"""Memory per voxel of `convert`, one fit step and the whole fit, the sectional path against the full-size one (issue 20).

    python benchmarks/memory.py [--resolutions 256,512,1024] [--meshes open/dc_dress_v7k.obj,closed/ddg_kitten.obj]
        [--paths sectional,old,bf16] [--steps 40] [--max-gb 10] [--json OUT.json] [--skip-convert | --convert-only]

Each case (mesh, resolution, path) runs in its own subprocess, so every peak is that process's own: peak resident
memory (VmHWM) on the CPU, CUDA's peak allocation with --device cuda. In the fit's child the peak is reset (Linux
``/proc/self/clear_refs``) after the initialisation and after the first step, so it reports the initialisation
(sampling + convert), one step, and the remaining steps separately; the whole fit is the largest of them.
Bytes per voxel = peak / voxels (the ~0.3 GB of Python + torch included). Paths: ``sectional`` (the default:
fit.optim.SectionalAdam, convert's samples answered tile by tile by fit.stream.TiledPoints), ``old`` (the path
before issue 20: one KD-tree over all samples, torch.optim.Adam over full-size tensors), ``bf16`` (sectional,
bfloat16 moments); ``convert`` is measured for the new and the old sample queries. A child whose resident memory passes --max-gb is stopped (polled twice a second), so
a case that would exceed it fails instead of taking the machine. Times from a loaded machine: compare ratios within one run. The fit's metrics against the input (CD,
F-score@0.001, normal consistency; point-to-surface with --points samples) are printed beside the memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "shared/data/meshes"


def _peak(device: str) -> int:
    from sparseflex.eval.resources import peak_memory_bytes
    return peak_memory_bytes(device)


def _reset_peak(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


def run_case(kind: str, mesh_path: str, resolution: int, path: str, steps: int, ratio: float, device: str,
             points: int) -> dict:
    """One case in this (child) process."""
    import torch

    torch.set_num_threads(1)
    from sparseflex.data.mesh import Mesh, load_mesh, normalize
    from sparseflex.eval.metrics import mesh_metrics
    from sparseflex.fit.convert import mesh_to_sparseflex
    from sparseflex.fit.fitter import FitConfig, Fitter

    if path == "old":  # today's path: one KD-tree over all samples, torch.optim.Adam over full tensors
        import sparseflex.fit.convert
        import sparseflex.fit.fitter
        from sparseflex.flexicubes.init_sdf import OrientedPoints
        sparseflex.fit.convert.TiledPoints = sparseflex.fit.fitter.TiledPoints = OrientedPoints
    gt, _ = normalize(load_mesh(mesh_path))
    gt = gt.to(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    row: dict = {"kind": kind, "mesh": Path(mesh_path).name, "resolution": resolution, "path": path}
    if kind == "convert":
        with torch.no_grad():
            sf = mesh_to_sparseflex(gt, resolution)
            ex = sf.extract()
        row.update(voxels=sf.num_voxels, seconds=round(time.perf_counter() - t0, 1), peak=_peak(device),
                   faces=len(ex.faces))
        return row
    optimizer, moments = {"sectional": ("sectional", "float32"), "old": ("adam", "float32"),
                          "bf16": ("sectional", "bfloat16")}[path]
    cfg = FitConfig(resolution=resolution, iterations=steps, visibility_ratio=ratio, checkpoint_every=0,
                    optimizer=optimizer, moment_dtype=moments)
    fitter = Fitter(gt, cfg, device=device)
    n = fitter.state.sf.num_voxels
    row.update(voxels=n, init_seconds=round(time.perf_counter() - t0, 1), init_peak=_peak(device))
    peaks, times = [], []
    for i in range(steps):
        if i < 2:
            _reset_peak(device)
        t = time.perf_counter()
        fitter.step()
        fitter.state.step += 1
        times.append(time.perf_counter() - t)
        if i < 1:
            peaks.append(_peak(device))
    peaks.append(_peak(device))
    row.update(step_peak=peaks[0], steps_peak=max(peaks), fit_peak=max(row["init_peak"], *peaks),
               step_seconds=round(sum(times) / len(times), 2), fit_seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(row), file=sys.stderr, flush=True)  # kept even if the extraction below fails
    fitter.sync()  # the rows the last sections left out take their deferred steps
    sf = fitter.state.sf
    del fitter  # the optimiser's moments and the samples, as `sparseflex fit` drops them before extracting
    _reset_peak(device)
    with torch.no_grad():
        ex = sf.extract()
    row.update(extract_peak=_peak(device))
    m = mesh_metrics(Mesh(ex.vertices.detach().cpu(), ex.faces.cpu()), gt.to("cpu"), num_points=points,
                     ceiling=False)
    row.update(chamfer=m["chamfer"], f001=m["fscore@0.001"], nc=m["normal_consistency"])
    return row


def _watch(proc: subprocess.Popen, limit: float | None) -> bool:
    """Wait for the child, killing it if its resident memory passes ``limit`` bytes (polled twice a second)."""
    while proc.poll() is None:
        if limit is not None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                rss = 0
            if rss > limit:
                proc.kill()
                proc.wait()
                return True
        time.sleep(0.5)
    return False


def child(args, kind: str, mesh: Path, resolution: int, path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(mesh), str(resolution), path, str(args.steps),
           str(args.ratio), args.device, str(args.points)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = _watch(proc, args.max_gb * 1e9 if args.device == "cpu" else None)
    stdout, stderr = proc.communicate()
    proc.stdout, proc.stderr = stdout, stderr
    if killed:
        return {"kind": kind, "mesh": mesh.name, "resolution": resolution, "path": path,
                "error": f"stopped: resident memory passed {args.max_gb:g} GB",
                "partial": [ln for ln in stderr.splitlines() if ln.startswith("{")][-1:]}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"killed (exit {proc.returncode})"])[-1]
        return {"kind": kind, "mesh": mesh.name, "resolution": resolution, "path": path, "error": tail[:160],
                "partial": [ln for ln in proc.stderr.splitlines() if ln.startswith("{")][-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gb(v):
    return "-" if v is None else f"{v / 1e9:.2f}"


def _bpv(v, n):
    return "-" if v is None or not n else f"{v / n:.0f}"


def print_row(r: dict) -> None:
    head = f"| {r['mesh'][:18]} | {r['resolution']} | {r['kind']} | {r['path']} |"
    if "error" in r:
        print(f"{head} failed: {r['error']} {' '.join(r.get('partial', []))} |", flush=True)
        return
    n = r["voxels"]
    if r["kind"] == "convert":
        print(f"{head} {n:,} | {_gb(r['peak'])} | {_bpv(r['peak'], n)} | | | | | {r['seconds']} | | | |", flush=True)
        return
    print(f"{head} {n:,} | {_gb(r['init_peak'])} | {_bpv(r['init_peak'], n)} | {_gb(r['step_peak'])} | "
          f"{_bpv(r['step_peak'], n)} | {_gb(r['fit_peak'])} ({_bpv(r['fit_peak'], n)}) | "
          f"{_gb(r['extract_peak'])} | {r['fit_seconds']} | "
          f"{r['step_seconds']} | {r['chamfer']:.3e} | {r['f001']:.3f} / {r['nc']:.5f} |", flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, mesh, res, path, steps, ratio, device, points = sys.argv[2:10]
        print(json.dumps(run_case(kind, mesh, int(res), path, int(steps), float(ratio), device, int(points))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", default="256,512,1024")
    ap.add_argument("--meshes", default="open/dc_dress_v7k.obj,closed/ddg_kitten.obj",
                    help="paths under --root (comma-separated)")
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--paths", default="sectional,old",
                    help="sectional (new), old (today's: one KD-tree, torch.optim.Adam), bf16 (sectional, bfloat16 "
                         "moments); convert runs for new and old")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ratio", type=float, default=0.0, help="visibility ratio (0: automatic)")
    ap.add_argument("--max-gb", type=float, default=10.0, help="resident memory a child may approach")
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--convert-only", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--points", type=int, default=100_000, help="samples for the fit's metrics")
    ap.add_argument("--json", default="", help="write the rows here too")
    args = ap.parse_args()
    rows = []
    print("| mesh | R | case | path | voxels | peak GB (convert / fit init) | B/voxel | step peak GB | B/voxel | "
          "whole fit GB (B/voxel) | final extract GB | s | s/step | CD | F@0.001 / NC |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mesh in args.meshes.split(","):
        for res in (int(r) for r in args.resolutions.split(",")):
            paths = [p for p in args.paths.split(",") if p]
            cases = ([] if args.skip_convert else [("convert", "old" if p == "old" else "new")
                                                     for p in paths if p in ("old", "sectional")])
            cases += [] if args.convert_only else [("fit", p) for p in paths]
            for kind, path in cases:
                rows.append(child(args, kind, Path(args.root) / mesh, res, path))
                print_row(rows[-1])
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""`sparseflex metrics` (mesh_metrics) time and peak memory: a good prediction against far-off ones, per mesh.

    python benchmarks/metrics.py [--root DIR] [--meshes closed/ddg_kitten.obj,...] [--points 300000]
        [--cases good,shrunk,x10,tetra_small,tetra_large] [--good subdivide|convert] [--resolution 256]
        [--repeat 3] [--skip-old] [--old-far-points 0] [--old-limit-gb 6]

Predictions, made from the ground truth normalised to [-0.5, 0.5]^3 (the protocol's frame, README):
  good         close to it: subdivided twice (16x the faces) with every vertex moved along its normal by up to 0.1 %
               of the extent (--good convert: `sparseflex convert` at --resolution instead, as the fits' metrics see)
  shrunk       the ground truth scaled by 0.5 about its centre (inside it, every sample far from it)
  x10          the ground truth scaled by 10 (another scale)
  tetra_small  a regular tetrahedron a tenth of its size at its centre
  tetra_large  a regular tetrahedron ten times its size
Every (case, algorithm) runs mesh_metrics (both directions, no ceiling) in its own subprocess, so its wall time,
CPU time (all threads) and peak resident memory are its own: "peak GB" is VmHWM over mesh_metrics (restarted
just before it; Python + torch and the loaded meshes included, ~0.3 GB), "+GB" its rise above the resident memory
before mesh_metrics. The OLD algorithm (the query before
issue 14, kept below as the baseline only) runs on the good case, where old/new compares their wall times (the
fastest of --repeat runs each, alternated); on far-off cases only with --old-far-points N, since there its memory
grows with the points (0.1 to 0.3 MB each, up to a 32k-point chunk) and its time about linearly: the child is
capped at --old-limit-gb of address space and reports a MemoryError.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2] / "shared/data/meshes"
CASES = ("good", "shrunk", "x10", "tetra_small", "tetra_large")


# -- BASELINE ONLY: the SurfaceDistance query before issue 14 (unbounded when the certificate fails far away) ----------

def old_surface_distance():
    """The pre-issue-14 query on today's mesh tables: k nearest centroids, and where the certificate fails, every
    centroid within ``u + h`` (counted with query_ball_point), all at once. Used only to measure the old cost."""
    from sparseflex.eval.metrics import SurfaceDistance

    class OldSurfaceDistance(SurfaceDistance):
        def __init__(self, vertices, faces, pieces_per_face: float = 4.0):
            super().__init__(vertices, faces, pieces_per_face)
            self.rows_table = np.ascontiguousarray(self.table.T)  # the old row-major table

        def query(self, points, k: int = 8, chunk: int = 1 << 15):
            from sparseflex.eval.metrics import _numpy

            p = _numpy(points, np.float64).reshape(-1, 3)
            dist, face = np.empty(len(p)), np.empty(len(p), dtype=np.int64)
            for s in range(0, len(p), chunk):
                dist[s:s + chunk], face[s:s + chunk] = self._old_query(p[s:s + chunk], k)
            return dist, self.faces[face]

        def _old_query(self, p, k):
            k = min(k, len(self))
            node_dist, node = self.tree.query(p, k=k, workers=-1)
            node_dist, node = node_dist.reshape(len(p), k), node.reshape(len(p), k)
            d2, face = self._old_nearest(p, self.node_face[node])
            dist = np.sqrt(d2)
            radius = dist * (1 + 1e-9) + 1e-12 + self.h
            open_ = np.flatnonzero((node_dist[:, -1] <= radius) & (k < len(self)))
            if len(open_):
                need = self.tree.query_ball_point(p[open_], radius[open_], return_length=True, workers=-1)
                bucket = np.maximum(k, 2 ** np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))
                for kk in np.unique(bucket):
                    rows = open_[bucket == kk]
                    kk = int(min(kk, len(self)))
                    if kk <= k:
                        continue
                    _, more = self.tree.query(p[rows], k=range(k + 1, kk + 1), workers=-1)
                    d2_more, face_more = self._old_nearest(p[rows], self.node_face[more.reshape(len(rows), -1)])
                    better = d2_more < d2[rows]
                    d2[rows[better]], face[rows[better]] = d2_more[better], face_more[better]
                dist = np.sqrt(d2)
            return dist, face

        def _old_nearest(self, p, cand):
            n, k = cand.shape
            d2 = self._old_squared_distance(np.repeat(p, k, axis=0), cand.reshape(-1)).reshape(n, k)
            best = d2.argmin(1)
            rows = np.arange(n)
            return d2[rows, best], cand[rows, best]

        def _old_squared_distance(self, p, face):
            from sparseflex.eval.metrics import _segment

            t = self.rows_table[face]
            ap = p - t[:, 0:3]
            x, y, z = ap[:, 0], ap[:, 1], ap[:, 2]
            d1 = x * t[:, 3] + y * t[:, 4] + z * t[:, 5]
            d2 = x * t[:, 6] + y * t[:, 7] + z * t[:, 8]
            pp = x * x + y * y + z * z
            aa, g, cc = t[:, 12], t[:, 13], t[:, 14]
            v = t[:, 15] * d1 - t[:, 16] * d2
            w = t[:, 17] * d2 - t[:, 16] * d1
            inside = (v >= 0) & (w >= 0) & (v + w <= 1)
            plane = x * t[:, 9] + y * t[:, 10] + z * t[:, 11]
            edges = np.minimum(np.minimum(_segment(pp, d1, aa), _segment(pp, d2, cc)),
                               _segment(pp - 2 * d1 + aa, d2 - d1 - g + aa, aa - 2 * g + cc))
            return np.where(inside, plane * plane, np.maximum(edges, 0.0))

    return OldSurfaceDistance


# -- one case in a child process --------------------------------------------------------------------------------------

def make_prediction(gt, case: str, good: str, resolution: int):
    """The prediction of a case, in the ground truth's (normalised) frame."""
    import torch
    import trimesh

    from sparseflex.data.mesh import Mesh

    v, f = gt.vertices.double(), gt.faces
    centre = (v.amin(0) + v.amax(0)) / 2
    tetra = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64) / 2
    tetra_faces = torch.tensor([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])
    if case == "good" and good == "convert":
        from sparseflex.fit.convert import mesh_to_sparseflex

        ex = mesh_to_sparseflex(gt, resolution).extract()
        return Mesh(ex.vertices.detach(), ex.faces)
    if case == "good":
        sv, sf = v.numpy(), f.numpy()
        for _ in range(2):
            sv, sf = trimesh.remesh.subdivide(sv, sf)
        normals = trimesh.Trimesh(sv, sf, process=False).vertex_normals
        shift = np.random.default_rng(0).uniform(-1e-3, 1e-3, (len(sv), 1))
        return Mesh(torch.from_numpy(sv + shift * normals), torch.from_numpy(sf))
    if case == "shrunk":
        return Mesh((v - centre) * 0.5 + centre, f)
    if case == "x10":
        return Mesh((v - centre) * 10 + centre, f)
    if case == "tetra_small":
        return Mesh(tetra * 0.1 + centre, tetra_faces)
    if case == "tetra_large":
        return Mesh(tetra * 10 + centre, tetra_faces)
    raise ValueError(case)


def _rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def measure(mesh_path: str, case: str, algorithm: str, points: int, good: str, resolution: int,
            limit_gb: float) -> dict:
    """mesh_metrics of one case with one algorithm; runs in the child."""
    from sparseflex.data.mesh import load_mesh, normalize
    from sparseflex.eval import metrics
    from sparseflex.eval.resources import peak_memory_bytes

    gt, _ = normalize(load_mesh(mesh_path))
    pred = make_prediction(gt, case, good, resolution)
    if algorithm == "old":
        metrics.SurfaceDistance = old_surface_distance()
        if case != "good":  # cap the address space: the old search can ask for tens of GB
            with open("/proc/self/status") as fh:
                size = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
            limit = size + int(limit_gb * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:  # restart the high-water mark (VmHWM): building the prediction (convert) must not count
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    before = _rss()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    try:
        m = metrics.mesh_metrics(pred, gt, num_points=points, ceiling=False)
    except MemoryError:
        return {"error": f"MemoryError (address space capped at +{limit_gb:g} GB)"}
    sec = time.perf_counter() - t0
    now = resource.getrusage(resource.RUSAGE_SELF)
    cpu = now.ru_utime + now.ru_stime - usage.ru_utime - usage.ru_stime
    peak = peak_memory_bytes()
    return {"faces": len(pred.faces), "seconds": round(sec, 2), "cpu_seconds": round(cpu, 2),
            "peak_gb": round(peak / 2 ** 30, 3), "rise_gb": round((peak - before) / 2 ** 30, 3),
            "chamfer": m["chamfer"], "fscore@0.01": m["fscore@0.01"]}


def child(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"killed (exit {proc.returncode})"])[-1]
        return {"error": tail[:90]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- table ------------------------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        print(json.dumps(measure(a[0], a[1], a[2], int(a[3]), a[4], int(a[5]), float(a[6]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--meshes", default="closed/ddg_kitten.obj", help="ground truths, relative to --root")
    ap.add_argument("--points", type=int, default=300_000)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--good", choices=("subdivide", "convert"), default="subdivide")
    ap.add_argument("--resolution", type=int, default=256, help="of --good convert")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the good case per algorithm (best kept)")
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--old-far-points", type=int, default=0, help="run the old algorithm on far-off cases too")
    ap.add_argument("--old-limit-gb", type=float, default=6.0)
    args = ap.parse_args()
    cases = args.cases.split(",")
    print(f"mesh_metrics, {args.points:,} points a mesh, both directions, no ceiling; one subprocess a run; "
          f"good = {args.good}")
    print(f"{'mesh':<22} {'case':<12} {'faces':>9} {'new s':>7} {'cpu s':>6} {'peak GB':>8} {'+GB':>6} {'CD':>10} "
          f"{'old s':>7} {'cpu s':>6} {'old +GB':>8} {'old/new s':>10}  old points")
    for rel in args.meshes.split(","):
        path = str(Path(args.root) / rel)
        for case in cases:
            common = [path, case]
            runs = []
            for _ in range(args.repeat if case == "good" else 1):
                runs.append(("new", child([*common, "new", str(args.points), args.good, str(args.resolution),
                                          str(args.old_limit_gb)])))
                old_points = args.points if case == "good" else args.old_far_points
                if not args.skip_old and old_points:
                    runs.append(("old", child([*common, "old", str(old_points), args.good, str(args.resolution),
                                              str(args.old_limit_gb)])))
            for name, r in runs:
                print(json.dumps({"mesh": rel, "case": case, "algorithm": name, **r}), file=sys.stderr, flush=True)
            new = _best([r for n, r in runs if n == "new"])
            old = _best([r for n, r in runs if n == "old"])
            if "error" in new:
                print(f"{Path(rel).name[:22]:<22} {case:<12} failed: {new['error']}")
                continue
            old_cols = ""
            old_points = args.points if case == "good" else args.old_far_points
            if old is not None and "error" in old:
                old_cols = f"  old failed: {old['error']}"
            elif old is not None:
                ratio = f"{old['seconds'] / max(new['seconds'], 1e-9):.2f}x" if old_points == args.points else ""
                same = "" if old_points != args.points else (
                    ", same CD" if old["chamfer"] == new["chamfer"] else f", CD {old['chamfer']:.6g}")
                old_cols = (f"{old['seconds']:>7.2f} {old['cpu_seconds']:>6.1f} {old['rise_gb']:>8.3f} {ratio:>10}  "
                            f"{old_points:,}{same}")
            print(f"{Path(rel).name[:22]:<22} {case:<12} {new['faces']:>9,} {new['seconds']:>7.2f} "
                  f"{new['cpu_seconds']:>6.1f} {new['peak_gb']:>8.3f} {new['rise_gb']:>6.3f} {new['chamfer']:>10.4g} "
                  f"{old_cols}", flush=True)


def _best(rows: list[dict]) -> dict | None:
    """The fastest successful run (timings on a shared machine only get slower), else the first failure."""
    ok = [r for r in rows if "error" not in r]
    if ok:
        return min(ok, key=lambda r: r["seconds"])
    return rows[0] if rows else None


if __name__ == "__main__":
    main()

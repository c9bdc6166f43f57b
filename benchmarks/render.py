"""Renderer benchmark: 512x512 mask + depth + normal, forward and backward, of a ~300k-triangle mesh.

Times each visibility path (torch, embree) through the full differentiable render and a loss backward, and the
raw Embree ray casting of the same rays (scene build + one ray per pixel, no torch) measured in the same run, which
is the limit the embree path approaches. Prints the figures and their ratios.

    python benchmarks/render.py [--mesh PATH] [--size 512] [--views 1] [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import trimesh

from sparseflex.render import embree_available, render, sphere_views
from sparseflex.render.visibility import _cast_rays_embreex, camera_rays, cast_rays

DEFAULT_MESH = Path(__file__).resolve().parents[2] / "shared" / "data" / "meshes" / "closed" / "ddg_kitten.obj"


def load_subdivided(path: Path, target: int):
    mesh = trimesh.load(path, force="mesh", process=True)
    mesh.apply_translation(-mesh.bounds.mean(0))
    mesh.apply_scale(1.0 / mesh.extents.max())
    while len(mesh.faces) * 4 <= target * 1.5:
        mesh = mesh.subdivide()
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.long)


def timed(fn, repeat: int) -> tuple[float, float]:
    """(median, best) wall time over ``repeat`` runs after a warm-up; the best is the figure least disturbed by
    other work on a shared machine."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", type=Path, default=DEFAULT_MESH)
    parser.add_argument("--faces", type=int, default=300_000, help="subdivide until about this many faces")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    vertices, faces = load_subdivided(args.mesh, args.faces)
    camera = sphere_views(args.views, radius=2.0, fov=35.0, size=args.size)
    target = render(vertices * 1.01, faces, camera, backend="torch")
    print(f"mesh {args.mesh.name}: {len(vertices)} vertices, {len(faces)} faces; {args.views} view(s) of "
          f"{args.size}x{args.size}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

    def step(backend):
        # A new faces tensor each step, as after an extraction: the mesh topology is recomputed every time.
        v = vertices.clone().requires_grad_(True)
        out = render(v, faces.clone(), camera, backend=backend)
        loss = ((out["mask"] - target["mask"]).abs().mean() + (out["depth"] - target["depth"]).abs().mean()
                + (out["normal"] - target["normal"]).abs().mean())
        loss.backward()
        return out

    def forward(backend):
        with torch.no_grad():
            render(vertices, faces.clone(), camera, backend=backend)

    rows = []
    if embree_available():
        origins, directions, tfar = camera_rays(camera)
        v_np, f_np = vertices.numpy(), faces.numpy()
        raw = timed(lambda: cast_rays(v_np, f_np, origins, directions, tfar), args.repeat)
        rows.append(("raw embree (build + cast)", raw, None))
        stock = timed(lambda: _cast_rays_embreex(v_np, f_np, origins, directions, tfar), max(1, args.repeat // 3))
        rows.append(("  same through embreex's API", stock, raw))
    else:
        raw = None
        print("embree not available: only the torch path is timed")
    for backend in (["embree"] if raw is not None else []) + ["torch"]:
        fwd = timed(lambda: forward(backend), args.repeat)
        full = timed(lambda: step(backend), args.repeat)
        rows.append((f"{backend}: forward", fwd, raw))
        rows.append((f"{backend}: forward + backward", full, raw))
    hit = (step("torch")["tri_id"] >= 0).float().mean().item()
    print(f"pixels covered: {hit:.1%}")
    print(f"{'what':32s} {'median s':>9s} {'best s':>9s} {'x raw embree (best)':>20s}")
    for name, (median, best), base in rows:
        ratio = f"{best / base[1]:20.2f}" if base else f"{'':20s}"
        print(f"{name:32s} {median:9.3f} {best:9.3f} {ratio}")
    if raw is not None:
        median, best = next(t for n, t, _ in rows if n == "embree: forward + backward")
        verdict = "meets" if median <= 0.5 else "misses"
        print(f"target: embree forward + backward <= 0.5 s -> median {median:.3f} s, best {best:.3f} s ({verdict})")


if __name__ == "__main__":
    main()

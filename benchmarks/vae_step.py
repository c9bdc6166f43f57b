"""SparseFlex VAE: forward + backward time and peak memory of one training step per config and resolution.

The input is a real mesh (normalised; surface samples with normals, active latent voxels as in training) and the
decoder is teacher-forced with the voxels the surface touches at each upsampled resolution, so the voxel counts are
those of training. The loss is a stand-in (head L2 + pruning BCE + KL): the rendering loss is timed elsewhere.
Each measurement runs in its own process, so the peak resident memory (VmHWM, minus the process's footprint
before the step) belongs to that step alone.

A second table (``--decode``) times inference decoding of the same latents whole and in chunks (``--chunk``
latent voxels per axis), with a fresh model whose zero-initialised pruning heads keep every child (the worst case).

    python benchmarks/vae_step.py [--mesh PATH] [--runs tiny:16,tiny:32,small:32,small:64] [--checkpointing]
    python benchmarks/vae_step.py --decode --runs small:32,small:64 --chunk 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sparseflex.eval.resources import peak_memory_bytes

DEFAULT_MESH = Path(__file__).resolve().parents[2] / "shared" / "data" / "meshes" / "closed" / "ddg_kitten.obj"


def rss_gb() -> float:
    return peak_memory_bytes() / 1e9


def measure(mesh_path: str, config: str, resolution: int, checkpointing: bool, repeat: int) -> dict:
    import torch

    from sparseflex.data.mesh import load_mesh, normalize
    from sparseflex.data.voxelize import voxelize
    from sparseflex.models import SparseFlexVAE, get_config, kl_divergence, mesh_inputs, pruning_bce
    from sparseflex.sparse import batched

    torch.manual_seed(0)
    mesh, _ = normalize(load_mesh(mesh_path))
    model = SparseFlexVAE(get_config(config, use_checkpoint=checkpointing))
    factor = model.config.upsample_factor
    inp = mesh_inputs(mesh, resolution, max(20_000, 40 * resolution ** 2), jitter=1.0 / factor)
    levels = [batched(voxelize(mesh, resolution * 2 ** (k + 1))) for k in range(len(model.config.upsample_channels))]
    base = rss_gb()

    def step():
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        dec, mean, logvar = model(inp.points, inp.normals, inp.point_batch, inp.coords, occupancy=levels,
                                  resolution=resolution)
        loss = dec.head.square().mean() + 1e-6 * kl_divergence(mean, logvar) + pruning_bce(dec.prune, levels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, dec

    times = [step() for _ in range(repeat + 1)][1:]  # first step warms up (plans, allocator)
    fwd, bwd = min(t[0] for t in times), min(t[1] for t in times)
    dec = times[0][2]
    return {"config": config, "latent": resolution, "output": resolution * factor, "checkpointing": checkpointing,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "latent_voxels": len(inp.coords), "candidates": [len(p.coords) for p in dec.prune],
            "output_voxels": len(dec.coords), "forward_s": round(fwd, 3), "backward_s": round(bwd, 3),
            "step_peak_gb": round(rss_gb() - base, 3), "threads": torch.get_num_threads()}


def measure_decode(mesh_path: str, config: str, resolution: int, chunk: int | None) -> dict:
    import torch

    from sparseflex.data.mesh import load_mesh
    from sparseflex.models import SparseFlexVAE
    from sparseflex.nn import SparseTensor
    from sparseflex.pipelines import encode_mesh
    from sparseflex.sparse import batched

    torch.manual_seed(0)
    model = SparseFlexVAE(config).eval()
    latent = encode_mesh(model, load_mesh(mesh_path), max(20_000, 40 * resolution ** 2), resolution=resolution)
    z = SparseTensor(batched(latent.coords), latent.feats)
    base = rss_gb()
    t0 = time.perf_counter()
    with torch.no_grad():
        dec = model.decode(z, resolution=resolution, chunk_size=chunk)
    return {"config": config, "latent": resolution, "output": dec.resolution, "chunk": chunk,
            "latent_voxels": len(z), "output_voxels": len(dec.coords), "seconds": round(time.perf_counter() - t0, 2),
            "peak_gb": round(rss_gb() - base, 3)}


def run_child(mesh: str, config: str, resolution: int, checkpointing: bool, repeat: int,
              decode_chunk: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mesh", mesh, "--runs", f"{config}:{resolution}",
           "--repeat", str(repeat)] + (["--checkpointing"] if checkpointing else [])
    if decode_chunk is not None:
        cmd += ["--decode", "--chunk", str(decode_chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"config": config, "latent": resolution, "error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default=str(DEFAULT_MESH))
    ap.add_argument("--runs", default="tiny:16,tiny:32,small:32,small:64",
                    help="comma-separated config:latent_resolution pairs")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in blocks and upsamplers")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--decode", action="store_true", help="time inference decoding, whole vs chunked")
    ap.add_argument("--chunk", type=int, default=16, help="chunk side in latent voxels for --decode (0: whole)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    runs = [(name, int(res)) for name, res in (r.split(":") for r in args.runs.split(","))]
    if args.child:
        if args.decode:
            print(json.dumps(measure_decode(args.mesh, *runs[0], args.chunk or None)))
        else:
            print(json.dumps(measure(args.mesh, *runs[0], args.checkpointing, args.repeat)))
        return
    if args.decode:
        print(f"mesh: {Path(args.mesh).name}; inference decoding, every child kept")
        print("| config | latent -> output | latent voxels | output voxels | chunk | seconds | peak RSS (GB) |")
        print("|---|---|---|---|---|---|---|")
        for name, res in runs:
            for chunk in (0, args.chunk):
                r = run_child(args.mesh, name, res, False, 1, chunk)
                if "error" in r:
                    print(f"| {name} | {res} | error: {r['error']} |")
                    continue
                print(f"| {name} | {r['latent']} -> {r['output']} | {r['latent_voxels']:,} | {r['output_voxels']:,} "
                      f"| {r['chunk'] or 'whole'} | {r['seconds']} | {r['peak_gb']} |", flush=True)
        return
    print(f"mesh: {Path(args.mesh).name}; activation checkpointing: {args.checkpointing}")
    print("| config | latent -> output | params (M) | latent voxels | candidates per level | output voxels "
          "| forward (s) | backward (s) | step peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, res in runs:
        r = run_child(args.mesh, name, res, args.checkpointing, args.repeat)
        if "error" in r:
            print(f"| {name} | {res} | error: {r['error']} |")
            continue
        print(f"| {name} | {r['latent']} -> {r['output']} | {r['params_m']} | {r['latent_voxels']:,} | "
              f"{' / '.join(f'{c:,}' for c in r['candidates'])} | {r['output_voxels']:,} | {r['forward_s']} | "
              f"{r['backward_s']} | {r['step_peak_gb']} |", flush=True)


if __name__ == "__main__":
    main()

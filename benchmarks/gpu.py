"""SparseFlex on one GPU in one table: fitting, TripoSF VAE inference and a VAE training step per preset.

    python benchmarks/gpu.py [--device cuda] [--mesh PATH] [--budget 480] [--parts fit,attention,vae,train]
                             [--only 'fit 256,train small'] [--json OUT]
    python benchmarks/gpu.py --device cpu --quick        # tiny sizes: checks the script on a CPU

Rows (each measured in its own process, so its peak memory is its own: CUDA's peak allocation, or on the CPU the
peak resident set since the stage began):

- ``fit R``: ``sparseflex fit``'s Fitter at resolution R (convert initialisation, then the steps): ms per step (median
  after the first), peak GB, F-score @0.01 / @0.001 in % against the input (README protocol, 100k points);
- ``attention B D``: one shifted-window attention layer of the release's width on the mesh's voxels, forward and
  backward, with each layout of :mod:`sparseflex.nn.attention` (B: buckets, pow2, varlen; D: float32, or bfloat16
  autocast on CUDA): ms, and the largest difference from the ``buckets`` result;
- ``triposf encode / decode whole / decode chunked / extract``: the release-sized VAE (random weights, its zero
  output layer randomised so that the decoded field has surfaces to extract) at a latent resolution: seconds,
  peak GB, and tokens (latent voxels), output voxels or faces;
- ``train P``: one training step of VAE preset P (its loss, views, image size, AMP, checkpointing) on the mesh at a
  given latent resolution and batch: seconds per step (median after a warm-up step), peak GB, tokens (latent
  voxels) per second.

The input is a mesh generated here (a torus and a sphere over its hole), or ``--mesh PATH``; nothing else is read from
outside the repository. Every part has a time budget (``--budget`` in all, 8 minutes by default, shared out in
proportion to ``BUDGET_SHARE``): a fit stops at its share and reports the steps it made, any other part that runs
past its share, or out of GPU memory, is reported as skipped with the reason. The ``CPU here`` column holds the same
measurement taken on the 2-core development machine (``CPU_REFERENCE``), where one was possible, else ``-``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Sizes of the full (GPU) run and of ``--quick`` (CPU check).
SIZES = {
    "full": {
        "fit": [(256, 600), (1024, 300)],                          # (resolution, iterations)
        "attention": {"resolution": 256, "channels": 768, "heads": 12},
        "vae": {"latent": 128, "chunk": 32},
        "train": {"tiny": (16, 4), "small": (32, 4), "triposf": (128, 1)},  # preset: (latent resolution, batch)
        "train_steps": 4,
    },
    "quick": {
        "fit": [(16, 6), (32, 4)],
        "attention": {"resolution": 32, "channels": 64, "heads": 2},
        "vae": {"latent": 8, "chunk": 4},
        "train": {"tiny": (8, 1), "small": (8, 1), "triposf": (8, 1)},
        "train_steps": 1,
        "train_overrides": ["image_size=48", "views_per_item=1"],
    },
}
#: Share of the budget per part (a fit 1024 converts ~10^7 corners on the CPU before its first step).
BUDGET_SHARE = {"fit 256": 0.10, "fit 1024": 0.31, "attention": 0.04, "vae": 0.16, "train tiny": 0.07,
                "train small": 0.09, "train triposf": 0.23}
#: Process start, CUDA initialisation and imports, counted against a part's share.
STARTUP_S = 10

#: The same rows measured on the development machine (2 shared CPU cores, torch CPU build, one thread per process,
#: other work running beside it: indicative only), ``python benchmarks/gpu.py --device cpu --parts ...``.
CPU_REFERENCE: dict[str, str] = {}


# -- inputs -------------------------------------------------------------------------------------------------------------
def input_mesh(path: str | None):
    """The mesh to measure, normalised to [-0.5, 0.5]^3: ``path``, or a generated torus with a sphere over its hole."""
    import torch
    import trimesh

    from sparseflex.data.mesh import Mesh, load_mesh, normalize
    if path:
        return normalize(load_mesh(path))[0]
    torus = trimesh.creation.torus(0.3, 0.1, major_sections=96, minor_sections=48)
    ball = trimesh.creation.icosphere(4, radius=0.18)
    ball.apply_translation([0.0, 0.0, 0.25])
    both = trimesh.util.concatenate([torus, ball])
    return normalize(Mesh(torch.tensor(both.vertices, dtype=torch.float32), torch.tensor(both.faces)))[0]


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """Peak memory of a stage: CUDA's peak allocation, or the peak resident set (reset through clear_refs)."""

    def __init__(self, device):
        self.device = device

    def reset(self) -> None:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def gb(self) -> float:
        from sparseflex.eval.resources import peak_memory_bytes
        _sync(self.device)
        return peak_memory_bytes(self.device) / 1e9


# -- the parts (each runs in a child process) ----------------------------------------------------------------------------
def part_fit(args, device, deadline: float, resolution: int, iterations: int) -> list[dict]:
    from sparseflex.data.mesh import Mesh
    from sparseflex.eval.metrics import mesh_metrics
    from sparseflex.fit.fitter import FitConfig, Fitter

    gt = input_mesh(args.mesh)
    peak = Peak(device)
    peak.reset()
    t0 = time.perf_counter()
    fitter = Fitter(gt, FitConfig(resolution=resolution, iterations=iterations, checkpoint_every=0), device=device)
    convert_s = time.perf_counter() - t0
    st, times = fitter.state, []
    reserve = 10 + resolution / 32  # extraction and metrics after the last step
    while st.step < iterations and time.monotonic() < deadline - reserve:
        t = time.perf_counter()
        fitter.step()  # ends by reading the loss: synchronised
        times.append(time.perf_counter() - t)
        st.step += 1
    fitter.sync()
    gb = peak.gb()
    ex = st.sf.extract()
    metrics = mesh_metrics(Mesh(ex.vertices.detach().cpu(), ex.faces.cpu()), gt, num_points=100_000, ceiling=False)
    steps = f"{st.step}/{iterations} steps" + ("" if st.step == iterations else " (budget)")
    return [{"row": f"fit {resolution}", "config": f"{steps}, {fitter.config.size()} px, convert {convert_s:.1f} s",
             "time": 1e3 * statistics.median(times[1:] or times) if times else None, "unit": "ms/step",
             "peak_gb": gb,
             "extra": f"F {metrics['fscore@0.01']:.1f}/{metrics['fscore@0.001']:.1f}"}]


def part_attention(args, device, deadline: float, resolution: int, channels: int, heads: int) -> list[dict]:
    import torch

    from sparseflex.data.voxelize import voxelize
    from sparseflex.nn import SparseTensor, SparseWindowSelfAttention, attention, window_plan
    from sparseflex.sparse import batched

    torch.manual_seed(0)
    coords = batched(voxelize(input_mesh(args.mesh), resolution)).to(device)
    x = SparseTensor(coords, torch.randn(len(coords), channels, device=device))
    layer = SparseWindowSelfAttention(channels, heads, 8, 4).to(device)
    plan = window_plan(x, 8, 4)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    peak, rows, reference = Peak(device), [], {}
    for dtype in dtypes:
        for backend in ("buckets", "pow2", "varlen"):
            if backend == "varlen" and not attention.varlen_supported(torch.zeros(1, 1, heads, channels // heads,
                                                                                    device=device, dtype=dtype)):
                continue
            if time.monotonic() > deadline:
                break
            half = dtype != torch.float32

            def run():
                feats = x.feats.detach().requires_grad_()
                with attention.attention_backend(backend), torch.autocast(device.type, torch.bfloat16, enabled=half):
                    out = layer(x.replace(feats)).feats
                out.float().square().mean().backward()
                return out.detach().float(), feats.grad
            run()
            peak.reset()
            times = []
            for _ in range(5):
                _sync(device)
                t = time.perf_counter()
                out, grad = run()
                _sync(device)
                times.append(time.perf_counter() - t)
            reference.setdefault(dtype, out)
            err = (out - reference[dtype]).abs().max().item()
            layout = plan.layout(attention.POW2_GRANULARITY if backend == "pow2" else plan.granularity)
            calls = 1 if backend == "varlen" else len(layout.buckets)
            pad = 0.0 if backend == "varlen" else 100 * (len(layout.index) / len(x) - 1)
            rows.append({"row": f"attention {backend} {str(dtype)[6:]}",
                         "config": f"{len(x):,} tokens, C {channels}, {heads} heads, window 8, fwd+bwd; "
                                   f"{calls} SDPA calls, padding {pad:.0f}%",
                         "time": 1e3 * statistics.median(times), "unit": "ms", "peak_gb": peak.gb(),
                         "extra": f"max diff {err:.1e}"})
    return rows


def part_vae(args, device, deadline: float, latent: int, chunk: int) -> list[dict]:
    import torch

    from sparseflex.models import SparseFlexVAE, get_config
    from sparseflex.nn import SparseTensor
    from sparseflex.pipelines.reconstruct import default_num_points, encode_mesh
    from sparseflex.sparse import batched

    torch.manual_seed(0)
    model = SparseFlexVAE(get_config("triposf", latent_resolution=latent)).to(device).eval()
    with torch.no_grad():  # a zero output layer gives no surface at all
        model.decoder.out_layer.weight.normal_(0, 0.1)
    gt = input_mesh(args.mesh)
    peak, rows = Peak(device), []
    size = f"latent {latent} -> {latent * model.config.upsample_factor}"

    def timed(fn):
        peak.reset()
        t = time.perf_counter()
        out = fn()
        _sync(device)
        return out, time.perf_counter() - t, peak.gb()

    points = default_num_points(latent)
    lat, s, gb = timed(lambda: encode_mesh(model, gt, points))
    rows.append({"row": "triposf encode", "config": f"{size}, {points:,} points", "time": s, "unit": "s",
                 "peak_gb": gb, "extra": f"{len(lat.coords):,} tokens"})
    z = SparseTensor(batched(lat.coords.to(device)), lat.feats.to(device), 1)
    with torch.no_grad():
        for label, chunk_size in (("decode whole", None), (f"decode chunk {chunk}", chunk)):
            if time.monotonic() > deadline:
                rows.append({"row": f"triposf {label}", "skipped": "its share of the budget is spent"})
                continue
            try:
                dec, s, gb = timed(lambda: model.decode(z, resolution=latent, chunk_size=chunk_size))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({"row": f"triposf {label}", "skipped": "out of GPU memory"})
                continue
            rows.append({"row": f"triposf {label}", "config": size, "time": s, "unit": "s", "peak_gb": gb,
                         "extra": f"{len(dec.coords):,} voxels"})
        if time.monotonic() > deadline:
            rows.append({"row": "triposf extract", "skipped": "its share of the budget is spent"})
            return rows
        sf = dec.sparseflex(0)
        del dec
        ex, s, gb = timed(lambda: sf.extract())
    rows.append({"row": "triposf extract", "config": f"{size}, {sf.num_voxels:,} voxels", "time": s, "unit": "s",
                 "peak_gb": gb, "extra": f"{len(ex.faces):,} faces"})
    return rows


def part_train(args, device, deadline: float, preset: str, latent: int, batch_size: int, steps: int,
               overrides: list[str]) -> list[dict]:
    import torch

    from sparseflex.data.dataset import collate
    from sparseflex.data.item import load_item, save_item
    from sparseflex.data.mesh import save_mesh
    from sparseflex.data.prepare import PrepareConfig, prepare_item
    from sparseflex.models import get_config
    from sparseflex.train.config import load_config
    from sparseflex.train.trainer import Trainer
    from sparseflex.train.vae_task import VAETask

    levels = len(get_config(preset).upsample_channels)
    with tempfile.TemporaryDirectory() as tmp:
        mesh_path = save_mesh(Path(tmp) / "mesh.ply", input_mesh(args.mesh))
        points = max(20_000, min(819_200, 40 * latent * latent))
        arrays, _ = prepare_item(mesh_path, PrepareConfig(points=points, resolution=latent, levels=levels, views=0),
                                 seed=0)
        save_item(Path(tmp) / "item.npz", arrays)
        item = {"name": "mesh", **load_item(Path(tmp) / "item.npz")}
        config = load_config(preset).override([
            f"steps={steps + 1}", "checkpoint_every=0", f"batch_size={batch_size}",
            f'model_overrides={{"latent_resolution": {latent}}}', *overrides])
        trainer = Trainer(VAETask(config), [item] * batch_size, config, Path(tmp) / "run", device=device, quiet=True)
        peak, times = Peak(device), []
        for step in range(steps + 1):
            if step and time.monotonic() > deadline:
                break
            batch = collate([item] * batch_size)
            batch["seeds"] = [step * batch_size + i for i in range(batch_size)]
            if step == 1:
                peak.reset()
            _sync(device)
            t = time.perf_counter()
            trainer.train_step(batch)
            _sync(device)
            times.append(time.perf_counter() - t)
        gb = peak.gb()
    tokens = len(item["coords"]) * batch_size
    per_step = statistics.median(times[1:] or times)
    note = "" if len(times) == steps + 1 else f", {len(times) - 1} timed (budget)"
    size = (f"latent {latent} -> {latent * get_config(preset).upsample_factor}, batch {batch_size}, "
            f"{config.views_per_item}x{config.image_size} px{', AMP' if config.amp and device.type == 'cuda' else ''}"
            f"{note}")
    return [{"row": f"train {preset}", "config": size, "time": per_step, "unit": "s/step", "peak_gb": gb,
             "extra": f"{tokens / per_step:,.0f} tok/s"}]


# -- driver ---------------------------------------------------------------------------------------------------------------
def plan(args) -> list[tuple[str, str, dict]]:
    """(name, function, keyword arguments) of every part selected."""
    sizes = SIZES["quick" if args.quick else "full"]
    parts = []
    if "fit" in args.parts:
        for i, (res, iters) in enumerate(sizes["fit"]):
            parts.append((("fit 256", "fit 1024")[i], "part_fit", {"resolution": res, "iterations": iters}))
    if "attention" in args.parts:
        parts.append(("attention", "part_attention", dict(sizes["attention"])))
    if "vae" in args.parts:
        parts.append(("vae", "part_vae", dict(sizes["vae"])))
    if "train" in args.parts:
        for preset, (latent, batch) in sizes["train"].items():
            parts.append((f"train {preset}", "part_train",
                          {"preset": preset, "latent": latent, "batch_size": batch,
                           "steps": args.train_steps or sizes["train_steps"],
                           "overrides": sizes.get("train_overrides", [])}))
    return parts


def run_child(args) -> None:
    import torch
    spec = json.loads(args.child)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    fn = globals()[spec["function"]]
    try:
        rows = fn(args, device, spec["deadline"], **spec["kwargs"])
    except torch.cuda.OutOfMemoryError as exc:
        rows = [{"row": spec["name"], "skipped": f"out of GPU memory ({str(exc).splitlines()[0][:80]})"}]
    print("ROWS " + json.dumps(rows), flush=True)


def fmt_row(r: dict) -> str:
    cpu = CPU_REFERENCE.get(r["row"], "-")
    if "skipped" in r:
        return f"{r['row']:<24} skipped: {r['skipped']}"
    value = "-" if r.get("time") is None else f"{r['time']:.3f} {r['unit']}" if not r["unit"].startswith("ms") \
        else f"{r['time']:.1f} {r['unit']}"
    return (f"{r['row']:<24} {value:>14} {r['peak_gb']:>8.2f} {r['extra']:>18} {cpu:>14}   {r['config']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for a CPU check of the script)")
    ap.add_argument("--mesh", help="mesh file to measure on (default: a generated torus and sphere)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole table (default 8 minutes)")
    ap.add_argument("--parts", default="fit,attention,vae,train", help="comma-separated: fit, attention, vae, train")
    ap.add_argument("--only", default="", help="comma-separated part names to keep (e.g. 'fit 256,train tiny')")
    ap.add_argument("--train-steps", type=int, default=0, help="timed training steps (default 4, quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the child processes on the CPU")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args)
        return
    import torch
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here; use --device cpu --quick to check the script on the CPU")
    args.parts = [p for p in args.parts.split(",") if p]
    parts = plan(args)
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        parts = [p for p in parts if p[0] in keep]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"SparseFlex GPU benchmark on {name}, torch {torch.__version__}, mesh "
          f"{args.mesh or 'generated torus + sphere'}, budget {args.budget:.0f} s{' (quick sizes)' if args.quick else ''}")
    print(f"{'row':<24} {'time':>14} {'peak GB':>8} {'result':>18} {'CPU here':>14}   size")
    start = time.monotonic()
    end = start + args.budget
    shares = sum(BUDGET_SHARE[p[0]] for p in parts) or 1.0
    results = []
    for i, (part, function, kwargs) in enumerate(parts):
        left = end - time.monotonic()
        later = sum(BUDGET_SHARE[p[0]] for p in parts[i + 1:]) / shares
        # this part's share, plus whatever earlier parts left unused, minus what later parts are owed
        allowed = left - later * args.budget
        if allowed < STARTUP_S + 5:
            rows = [{"row": part, "skipped": f"would not fit: {max(allowed, 0):.0f} s of the budget left for it"}]
        else:
            spec = {"function": function, "kwargs": kwargs, "name": part,
                    "deadline": time.monotonic() + allowed - STARTUP_S}
            cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--device", args.device,
                   "--threads", str(args.threads)] + (["--mesh", args.mesh] if args.mesh else [])
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=allowed, env=env)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
                if proc.returncode or not lines:
                    tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                    rows = [{"row": part, "skipped": f"failed: {tail[:150]}"}]
                else:
                    rows = json.loads(lines[-1][5:])
            except subprocess.TimeoutExpired:
                rows = [{"row": part, "skipped": f"ran past its {allowed:.0f} s share of the budget"}]
        for r in rows:
            print(fmt_row(r), flush=True)
        results.extend(rows)
    print(f"total {time.monotonic() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": results},
                                              indent=1))


if __name__ == "__main__":
    main()

"""Image-to-3D, structure stage: training step time and peak memory of the structure VAE and the structure flow per
preset, and the time to sample a structure (50 Euler steps with classifier-free guidance), as one table.

    python benchmarks/structure.py [--presets tiny,small,trellis] [--batch 1] [--steps 3] [--sample-steps 50]
                                   [--device cpu] [--threads 2]

Each case runs in its own process, so that its peak memory (CPU: peak RSS, including the interpreter and torch,
about 0.3-0.4 GB; CUDA: max allocated) is its own. The structure is the latent voxels of a sphere at the preset's
resolution; the flow's condition is random image tokens of the preset's width (the image encoder is frozen and its
cost is measured on its own: one row per encoder). The first step is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _peak(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _grid(resolution: int, batch: int):
    import torch
    axis = (torch.arange(resolution) + 0.5) / resolution - 0.5
    r = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).norm(dim=0)
    shell = ((r - 0.35).abs() < 1.0 / resolution).float()  # a sphere's surface voxels
    return shell[None, None].expand(batch, 1, -1, -1, -1).contiguous()


def case(kind: str, preset: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = {"model": kind, "preset": preset}
    if kind == "image-encoder":
        from sparseflex.models.image_encoder import ImageEncoder
        model = ImageEncoder(preset).to(device).eval()
        images = torch.rand(args.batch, 3, model.config.image_size, model.config.image_size, device=device)
        times = []
        for i in range(args.steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                model(images)
            _sync(device)
            times.append(time.perf_counter() - t0)
        out.update(params=sum(p.numel() for p in model.parameters()), step_s=min(times[1:]), peak_gb=_peak(device))
        return out
    if kind == "structure-vae":
        from sparseflex.models.structure_vae import StructureVAE, structure_vae_loss
        model = StructureVAE(preset).to(device)
        grid = _grid(model.config.resolution, args.batch).to(device)

        def step():
            mean, logvar = model.encode(grid)
            logits = model.decode(model.sample(mean, logvar))
            return structure_vae_loss(logits, grid, mean, logvar)[0]
        out["resolution"] = model.config.resolution
    else:
        from sparseflex.models.flow import RectifiedFlow
        from sparseflex.models.structure_flow import StructureFlow
        model = StructureFlow(preset).to(device)
        cfg = model.config
        tokens = 1 + 4 + (518 // 14) ** 2 if cfg.cond_channels >= 768 else 1 + 4 + 7 ** 2  # DINOv2-reg vs tiny
        cond = torch.randn(args.batch, tokens, cfg.cond_channels, device=device)
        x0 = torch.randn(args.batch, cfg.in_channels, *[cfg.resolution] * 3, device=device)
        flow = RectifiedFlow()
        gen = torch.Generator().manual_seed(0)

        def step():
            return flow.loss(model, x0, cond, gen).loss
        out["resolution"] = cfg.resolution
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(args.steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        loss = step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    out.update(params=sum(p.numel() for p in model.parameters()), step_s=min(times[1:]), peak_gb=_peak(device))
    if kind == "structure-flow" and args.sample_steps:
        from sparseflex.pipelines.samplers import euler_sample, gaussian_noise, guided_velocity
        model.eval()
        noise = gaussian_noise(x0.shape, 0, device)
        _sync(device)
        t0 = time.perf_counter()
        euler_sample(guided_velocity(model, cond[:1].expand(len(x0), -1, -1)), noise, args.sample_steps)
        _sync(device)
        out["sample_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small,trellis")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up step")
    ap.add_argument("--sample-steps", type=int, default=50, help="Euler steps of the sampling timing (0: skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(*args.case, args)))
        return
    encoders = {"tiny": "tiny", "small": "tiny", "trellis": "dinov2-vitl14-reg"}
    presets = args.presets.split(",")
    cases = [(k, p) for k in ("structure-vae", "structure-flow") for p in presets]
    cases += [("image-encoder", e) for e in dict.fromkeys(encoders[p] for p in presets)]
    print(f"device {args.device}, {args.threads} threads, batch {args.batch}, best of {args.steps} steps")
    print(f"{'model':<16}{'preset':<20}{'params':>14}{'res':>6}{'step s':>10}{'peak GB':>10}"
          f"{'sample s (' + str(args.sample_steps) + ' steps)':>24}")
    for kind, preset in cases:
        cmd = [sys.executable, __file__, "--case", kind, preset, "--batch", str(args.batch), "--steps",
               str(args.steps), "--sample-steps", str(args.sample_steps), "--device", args.device, "--threads",
               str(args.threads)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            reason = (run.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][:60]
            print(f"{kind:<16}{preset:<20}  failed: {reason}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        sample = f"{r['sample_s']:.2f}" if "sample_s" in r else "-"
        print(f"{kind:<16}{preset:<20}{r['params']:>14,}{r.get('resolution', '-'):>6}{r['step_s']:>10.3f}"
              f"{r['peak_gb']:>10.2f}{sample:>24}", flush=True)


if __name__ == "__main__":
    main()

"""Train a small SparseFlex VAE on the CPU for a wall-time budget, then reconstruct the validation meshes beside
`convert` at the same output resolution.

    python benchmarks/train_vae_cpu.py [--minutes 60] [--config small] [--latent 16] [--out out/train_vae_cpu]
                                       [--meshes ../shared/data/meshes] [--val-fraction 0.2]

1. Prepares the shared meshes (closed, open, interior) into ``OUT/prepared`` (``sparseflex.data.prepare``; latent
   resolution ``--latent``, occupancy at 2x and 4x; reused when already there), split into train / val by a stable
   hash of the name.
2. Trains the ``--config`` preset on the train split for ``--minutes`` (the cosine schedule is sized from the time of
   the first steps so that it ends with the budget) into ``OUT/run`` (checkpoint.pt, metrics.jsonl, loss.png).
3. Reconstructs every validation mesh with the EMA weights (``sparseflex.pipelines.reconstruct``) and converts it
   (``sparseflex.fit.convert``) at the same output resolution; prints CD (x10^4), F-score@0.001, F-score@0.01 and
   normal consistency of both, point-to-surface protocol (README), and writes ``OUT/results.json`` and one
   ``OUT/MESH_compare.png`` per validation mesh (normal renders: ground truth, VAE, convert).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparseflex.data.dataset import PreparedDataset
from sparseflex.data.mesh import Mesh, load_mesh, normalize
from sparseflex.data.prepare import PrepareConfig, prepare_dataset
from sparseflex.eval.metrics import mesh_metrics
from sparseflex.fit.convert import mesh_to_sparseflex
from sparseflex.fit.report import comparison_image
from sparseflex.pipelines.reconstruct import reconstruct
from sparseflex.train.config import load_config
from sparseflex.train.trainer import Trainer
from sparseflex.train.vae_task import VAETask

MESHES = Path(__file__).resolve().parents[2] / "shared/data/meshes"
KEYS = ("chamfer", "fscore@0.001", "fscore@0.01", "normal_consistency")
CALIBRATION_STEPS = 5


def train(args, data: Path, run_dir: Path) -> Trainer:
    dataset = PreparedDataset(data, "train")
    config = load_config(args.config).override(
        [f"model_overrides={json.dumps({'latent_resolution': args.latent})}", f"image_size={args.image_size}",
         f"views_per_item={args.views}", f"batch_size={args.batch_size}", "checkpoint_every=50",
         f"lr={args.lr}", "warmup_steps=50", f"steps={10 ** 7}"] + args.set)
    trainer = Trainer(VAETask(config), dataset, config, run_dir, device="cpu",
                      resume=(run_dir / "checkpoint.pt").exists())
    if args.eval_only:
        return trainer
    budget = args.minutes * 60
    start = time.monotonic()
    if trainer.step < CALIBRATION_STEPS:
        trainer.quiet = True  # its progress bar would count to the placeholder step count
        trainer.run(until=CALIBRATION_STEPS)
        trainer.quiet = False
    per_step = sum(r["seconds"] for r in trainer.history()) / max(len(trainer.history()), 1)
    # the scheduler reads config.steps at every step, so sizing it now stretches the cosine over the budget
    trainer.config.steps = max(trainer.step + 1, int(budget / per_step))
    print(f"{len(dataset)} training items, {per_step:.2f} s/step -> about {trainer.config.steps} steps", flush=True)
    trainer.run(seconds=max(budget - (time.monotonic() - start), 0))
    return trainer


def evaluate(args, data: Path, trainer: Trainer) -> list[dict]:
    val = PreparedDataset(data, "val")
    model = trainer.ema_model().eval()
    out_res = args.latent * model.config.upsample_factor
    rows = []
    for record in val.records:
        mesh = load_mesh(Path(args.meshes) / record["source"])
        t0 = time.perf_counter()
        with torch.no_grad():
            rec = reconstruct(model, mesh, num_points=args.points, resolution=args.latent, chunk_size=args.chunk,
                              metrics=True, metrics_points=args.metrics_points)
        t_rec = time.perf_counter() - t0
        normed, _ = normalize(mesh)
        t0 = time.perf_counter()
        ex = mesh_to_sparseflex(normed, out_res).extract()
        t_conv = time.perf_counter() - t0
        conv = mesh_metrics(Mesh(ex.vertices, ex.faces), normed, num_points=args.metrics_points, ceiling=False)
        with torch.no_grad():
            rec_ex = rec.sparseflex.extract()
        comparison_image(normed, {"VAE": Mesh(rec_ex.vertices, rec_ex.faces), "convert": Mesh(ex.vertices, ex.faces)},
                         Path(args.out) / f"{Path(record['source']).stem}_compare.png", size=192)
        rows.append({"name": record["name"], "resolution": out_res, "reconstruct": rec.metrics,
                     "reconstruct_seconds": t_rec, "convert": conv, "convert_seconds": t_conv})
        for label, m, sec in (("reconstruct", rec.metrics, t_rec), ("convert", conv, t_conv)):
            vals = " ".join(f"{m[k]:>8.3f}" if m[k] is not None else f"{'-':>8}" for k in KEYS)
            print(f"{record['name'][:34]:<34} {label:<11} {vals} {sec:>6.1f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--config", default="small", help="training preset or JSON (default small)")
    ap.add_argument("--latent", type=int, default=16, help="latent resolution (output = 4x)")
    ap.add_argument("--meshes", default=str(MESHES))
    ap.add_argument("--out", default="out/train_vae_cpu")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--prepare-points", type=int, default=65_536)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (a short run wants more than 1e-4)")
    ap.add_argument("--set", action="append", default=[], help="training config key=value (repeatable)")
    ap.add_argument("--points", type=int, default=65_536, help="encoder input points at reconstruction")
    ap.add_argument("--chunk", type=int, default=None, help="chunked decoding side (default: whole)")
    ap.add_argument("--metrics-points", type=int, default=300_000)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the run in OUT/run as it is (no training)")
    args = ap.parse_args()

    out = Path(args.out)
    data = out / "prepared"
    prepare_dataset(args.meshes, data, PrepareConfig(points=args.prepare_points, resolution=args.latent, levels=2,
                                                     views=0, val_fraction=args.val_fraction), workers=1)
    trainer = train(args, data, out / "run")
    print(f"trained {trainer.step} steps; loss curve {out / 'run' / 'loss.png'}", flush=True)
    print(f"{'mesh':<34} {'method':<11} {'CD':>8} {'F@.001':>8} {'F@.01':>8} {'NC':>8} {'sec':>6}")
    rows = evaluate(args, data, trainer)
    for label in ("reconstruct", "convert"):
        ok = [r[label] for r in rows if r[label]["chamfer"] is not None]
        if ok:
            mean = " ".join(f"{sum(m[k] for m in ok) / len(ok):>8.3f}" for k in KEYS)
            print(f"{'MEAN (' + str(len(ok)) + '/' + str(len(rows)) + ' meshes)':<34} {label:<11} {mean}")
    (out / "results.json").write_text(json.dumps({"steps": trainer.step, "config": trainer.config.to_dict(),
                                                  "meshes": rows}, indent=2))


if __name__ == "__main__":
    main()

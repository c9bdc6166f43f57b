"""`sparseflex train TASK --config C --data PREPARED_DIR -o RUN_DIR`: train a model on a prepared dataset.

Tasks: ``vae`` (the SparseFlex VAE, by rendering losses), ``structure-vae`` (the dense VAE of the latent voxels'
occupancy), ``structure-flow`` (the image-conditioned rectified flow generating structure latents; give it the
structure VAE with ``--set flow.structure_vae=RUN/checkpoint.pt``), ``slat-flow`` (the flow generating the SparseFlex
VAE's latent on a structure; ``--data`` is a latent folder written by ``sparseflex data encode``). Every task has the
same run folder and resume.
Multi-GPU / multi-node: launch with torchrun (``torchrun --nproc_per_node G -m sparseflex train vae ...``); the
global ``--batch-size`` is split over the processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import OptionError
from .common import check_device, device_option, new_dir, number, run_folder, seed_option

# sparseflex.train.config.TASKS, spelled out so that parsing options imports no torch
TASKS = ("vae", "structure-vae", "structure-flow", "slat-flow")
#: Options that only the rendering-based VAE task uses.
VAE_ONLY = ("image_size", "views_per_item", "visibility_ratio")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (VAE, structure VAE, structure or SLat flow) on a prepared dataset",
                       description=__doc__)
    p.add_argument("task", choices=TASKS, help="what to train")
    p.add_argument("--config", default="tiny",
                   help="preset name of the task (tiny, small; triposf for vae, trellis for the others), JSON file "
                        "or JSON text (default tiny)")
    p.add_argument("--data", required=True,
                   help="prepared dataset directory (sparseflex data prepare); for slat-flow a latent folder "
                        "(sparseflex data encode)")
    p.add_argument("--split", default="train", choices=("train", "val", "all"), help="dataset split (default train)")
    p.add_argument("-o", "--output", required=True, help="run directory: checkpoint.pt, metrics.jsonl, loss.png")
    p.add_argument("--steps", type=number(int, 1, 1 << 40), help="total optimisation steps")
    p.add_argument("--batch-size", type=number(int, 1, 1 << 20),
                   help="global batch size (split over torchrun processes)")
    p.add_argument("--lr", type=number(float, 0, 1, low_open=True), help="peak learning rate, in (0, 1]")
    p.add_argument("--image-size", type=number(int, 16, 4096), help="rendered image size in pixels (16..4096)")
    p.add_argument("--views-per-item", type=number(int, 1, 1024), help="cameras per item and step (1..1024)")
    p.add_argument("--visibility-ratio", type=number(float, 0, 1, low_open=True),
                   help="fraction of voxels each view's frustum section keeps, in (0, 1]")
    p.add_argument("--seed", type=seed_option)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any training config field, e.g. --set loss.kl=1e-5 (repeatable)")
    p.add_argument("--device", type=device_option, default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in RUN_DIR/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start again even if RUN_DIR holds a previous run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


FLAGS = {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "image_size": "image_size",
         "views_per_item": "views_per_item", "visibility_ratio": "visibility_ratio", "seed": "seed"}


def run(args) -> int:
    import torch

    from ..train.config import TrainConfig, load_config
    from ..train.tasks import build_task, open_dataset
    from ..train.trainer import Trainer, default_device, load_checkpoint

    out = Path(args.output)
    ckpt = run_folder(out, args.resume, args.overwrite, "run")
    data = Path(args.data)
    if not data.is_dir():
        raise OptionError(f"data directory {data} does not exist")
    device = torch.device(args.device) if args.device else default_device()
    check_device(device)

    if args.task != "vae":
        given = [flag for flag in VAE_ONLY if getattr(args, flag) is not None]
        if given:
            raise OptionError(f"--{given[0].replace('_', '-')} is an option of `train vae`, not of `train {args.task}`")
    overrides = [f"{field}={json.dumps(getattr(args, flag))}" for flag, field in FLAGS.items()
                 if getattr(args, flag) is not None]
    if args.resume:  # the run's own config; only the number of steps may change
        if args.set or any(getattr(args, flag) is not None for flag in FLAGS if flag != "steps"):
            raise OptionError("with --resume only --steps may change; the run keeps its training config")
        config = TrainConfig.from_dict(load_checkpoint(ckpt)["config"])
        if config.task != args.task:
            raise OptionError(f"{ckpt} is a {config.task} run; resume it with `sparseflex train {config.task}`")
        config.steps = args.steps or config.steps
    else:
        config = load_config(args.config, args.task).override(overrides + list(args.set))

    dataset = open_dataset(config, data, args.split)
    if len(dataset) == 0:
        raise OptionError(f"{data} holds no items in split {args.split!r}")
    task = build_task(config, dataset)  # checks what the task needs (e.g. the structure VAE of a structure flow)
    with new_dir(out, keep=("checkpoint.pt",)):  # a new run failing before its first checkpoint leaves nothing
        trainer = Trainer(task, dataset, config, out, device=device, resume=args.resume, quiet=args.quiet)
        try:
            trainer.run()
        except KeyboardInterrupt:
            print(f"interrupted at step {trainer.step}; resume with: sparseflex train {args.task} --data {data} "
                  f"-o {out} --resume", file=sys.stderr)
            return 130
    if trainer.rank == 0:
        last = (trainer.history() or [{}])[-1]
        print(json.dumps({"run": str(out), "steps": trainer.step, "epochs": trainer.epoch,
                          "loss": last.get("loss"), "checkpoint": str(ckpt)}, indent=2))
    return 0

"""`sparseflex data prepare|stats|encode|latent-stats`: turn a folder of meshes into training items; summarise a
prepared folder; encode its items with a trained VAE for the latent flow and compute the latents' statistics."""

from __future__ import annotations

import os

from .common import device_option, new_dir, number, output_dir, output_path, positive_int, seed_option


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare training data from a folder of meshes, or summarise it",
                       description=__doc__)
    cmd = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    from ..data.prepare import PrepareConfig
    d = PrepareConfig()
    q = cmd.add_parser("prepare", help="prepare every mesh of a folder (resumable, shardable)",
                       description="Per mesh: normalise, sample points with normals, latent voxels, occupancy per "
                                   "level, conditioning renders; one .npz per item plus manifest.jsonl and "
                                   "failures.json. Re-running skips finished items; shards write their own part "
                                   "of the manifest and every run merges all parts it finds. A run locks its shard "
                                   "of OUT_DIR (OUT_DIR/.lock-shard-I-of-N): a second run of the same shard into the "
                                   "same folder stops at once with an error, while different shards run side by "
                                   "side.")
    q.add_argument("input_dir", help="folder searched recursively for OBJ, PLY, STL, OFF, GLB, GLTF files")
    q.add_argument("out_dir", help="output folder (created; an earlier run's folder is resumed; any other folder "
                                   "must be empty)")
    q.add_argument("--shard", default="0/1", help="I/N: prepare only files I, I+N, I+2N, ... of the sorted list")
    q.add_argument("--workers", type=number(int, 0, 4096), default=max(1, os.cpu_count() or 1),
                   help="worker processes (default: one per CPU; 0 = in this process, no timeout)")
    q.add_argument("--points", type=number(int, 1, 1 << 26), default=d.points,
                   help=f"surface points (default {d.points:,})")
    q.add_argument("--resolution", type=number(int, 2, 4096), default=d.resolution,
                   help=f"latent voxel resolution R (2..4096, default {d.resolution})")
    q.add_argument("--levels", type=number(int, 0, 4), default=d.levels,
                   help=f"occupancy levels 2R, 4R, ... (0..4, default {d.levels})")
    q.add_argument("--views", type=number(int, 0, 64), default=d.views,
                   help=f"conditioning renders (0..64, default {d.views}, 0: none)")
    q.add_argument("--image-size", type=number(int, 16, 2048), default=d.image_size,
                   help=f"render size in pixels (16..2048, default {d.image_size})")
    q.add_argument("--val-fraction", type=number(float, 0, 1, high_open=True), default=d.val_fraction,
                   help=f"share of items in the validation split, in [0, 1) (default {d.val_fraction})")
    q.add_argument("--seed", type=seed_option, default=d.seed)
    q.add_argument("--timeout", type=number(float, 0, low_open=True), default=600.0,
                   help="seconds allowed per mesh (default 600)")
    q.add_argument("--retry-failed", action="store_true", help="try again the meshes an earlier run failed on")
    q.set_defaults(func=run_prepare)

    s = cmd.add_parser("stats", help="print a summary table and write a contact sheet of a prepared folder")
    s.add_argument("out_dir", help="a folder written by `sparseflex data prepare`")
    s.add_argument("--sheet", default=None,
                   help="contact sheet PNG (default OUT_DIR/contact_sheet.png, which is replaced each time)")
    s.add_argument("--max-items", type=positive_int, default=64, help="items on the contact sheet (default 64)")
    s.add_argument("--overwrite", action="store_true", help="replace the file given as --sheet if it exists")
    s.set_defaults(func=run_stats)

    e = cmd.add_parser("encode", help="encode every prepared item with a trained VAE (resumable, shardable)",
                       description="Per prepared item: the VAE's posterior mean on the item's own points, normals "
                                   "and latent voxels, one OUT/items/NAME.safetensors (coords, feats), plus "
                                   "manifest.jsonl (split copied from the prepared folder), failures.json, "
                                   "config.json (the checkpoint and its sha256) and stats.json (train split). "
                                   "Re-running skips encoded items; a resume with another checkpoint is refused. "
                                   "Shards and locks as in `data prepare`.")
    e.add_argument("prepared_dir", help="a folder written by `sparseflex data prepare`")
    e.add_argument("--checkpoint", required=True, help="the VAE (training checkpoint or safetensors)")
    e.add_argument("-o", "--output", dest="out_dir", required=True,
                   help="latent folder (created; an earlier run's folder is resumed; any other must be empty)")
    e.add_argument("--shard", default="0/1", help="I/N: encode only items I, I+N, I+2N, ... of the manifest")
    e.add_argument("--device", type=device_option, default=None,
                   help="torch device (default: cuda when available, else cpu)")
    e.add_argument("--batch-size", type=number(int, 1, 4096), default=4, help="items per encoder call (default 4)")
    e.add_argument("--logvar", action="store_true",
                   help="also store the posterior log-variance (float16), for trainers that sample the posterior")
    e.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run's latents in the folder first (e.g. to change the checkpoint)")
    e.set_defaults(func=run_encode)

    from ..data.dataset import SPLITS
    t = cmd.add_parser("latent-stats", help="per-channel mean and std of the latents of a split",
                       description="Merges the manifest of all shards, prints the statistics as JSON and, for the "
                                   "train split, writes them to LATENTS/stats.json (what the flow normalises with).")
    t.add_argument("latent_dir", help="a folder written by `sparseflex data encode`")
    t.add_argument("--split", choices=SPLITS, default="train", help="train (default), val or all")
    t.set_defaults(func=run_latent_stats)


def run_prepare(args) -> int:
    from ..data.prepare import PrepareConfig, check_input_dir, check_out_dir, in_use, parse_shard, prepare_dataset

    # everything the user gave is checked before anything is created
    shard = parse_shard(args.shard)
    config = PrepareConfig(points=args.points, resolution=args.resolution, levels=args.levels, views=args.views,
                           image_size=args.image_size, seed=args.seed, val_fraction=args.val_fraction)
    check_input_dir(args.input_dir)
    out = check_out_dir(output_dir(args.out_dir))
    # a folder made here is removed if the run fails, unless it holds finished items or another shard works in it
    with new_dir(out, keep=lambda folder: any((folder / "parts").glob("*.jsonl")) or in_use(folder)):
        prepare_dataset(args.input_dir, out, config, shard=shard, workers=args.workers, timeout=args.timeout,
                        retry_failed=args.retry_failed, log=lambda line: print(line, flush=True))
    return 0


def run_stats(args) -> int:
    from pathlib import Path

    from ..data import manifest
    from ..data.prepare import read_config
    from ..data.report import contact_sheet

    if args.sheet is not None:  # the user's file: checked before any work, never replaced without --overwrite
        sheet = output_path(args.sheet, args.overwrite, (".png",))
    else:
        sheet = Path(args.out_dir) / "contact_sheet.png"
    config = read_config(args.out_dir)
    output_dir(args.out_dir)  # merging rewrites the manifest
    ok, failed = manifest.merge(Path(args.out_dir), config.val_fraction, config.seed)
    rows = [("settings", f"points {config.points:,}, latent {config.resolution}^3, occupancy "
                         f"{', '.join(f'{r}^3' for r in config.occupancy_resolutions) or 'none'}, "
                         f"{config.views} views of {config.image_size} px")] + manifest.summarize(ok, failed)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if ok:
        contact_sheet(args.out_dir, ok, sheet, max_items=args.max_items)
        print(f"contact sheet: {sheet}")
    return 0


def run_encode(args) -> int:
    from ..data.latents import encode_dataset
    from ..data.prepare import in_use, parse_shard

    shard = parse_shard(args.shard)
    out = output_dir(args.out_dir)
    # a folder made here is removed if the run fails, unless it holds encoded items or another shard works in it
    with new_dir(out, keep=lambda folder: any((folder / "parts").glob("*.jsonl")) or in_use(folder)):
        encode_dataset(args.prepared_dir, args.checkpoint, out, shard=shard, device=args.device,
                       batch_size=args.batch_size, logvar=args.logvar, overwrite=args.overwrite,
                       log=lambda line: print(line, flush=True))
    return 0


def run_latent_stats(args) -> int:
    import json
    from pathlib import Path

    from ..data.latents import latent_stats, merge, read_latent_config, write_stats

    root = Path(args.latent_dir)
    read_latent_config(root)
    output_dir(root)  # merging rewrites the manifest
    merge(root)  # the union of all shards, as `data encode` leaves it
    stats = write_stats(root) if args.split == "train" else latent_stats(root, args.split)
    print(json.dumps({**stats, "split": args.split}, indent=1))
    return 0

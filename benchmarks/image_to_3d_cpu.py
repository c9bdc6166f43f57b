"""Image-to-3D end to end on the CPU for a wall-time budget: prepare the shared meshes, train the four models, write
the generator, generate from renders the models never saw, and evaluate it beside the VAE's own reconstruction and a
retrieval baseline, in the same run.

    python benchmarks/image_to_3d_cpu.py [--minutes 120] [--out out/image_to_3d_cpu] [--root ../shared/data/meshes]
                                         [--meshes N] [--resolution 16|32] [--seed 0] [--threads 0] [--eval-only]
                                         [--steps 50] [--guidance 3.5] [--metrics-points 100000]

Stages (every output under ``--out``, whose ``state.json`` records the settings, which a later run must repeat, and
each stage's seconds; a finished stage is skipped when the script runs again, an interrupted training, by Ctrl-C or
killed outright, resumes from its checkpoint for what is left of its budget):

1. ``meshes/``, ``prepared/``: ``--meshes N`` of the meshes under ``--root`` (taken in turn from each group folder:
   closed, open, interior) are linked into ``meshes/`` and prepared (``sparseflex.data.prepare``) at latent
   resolution ``--resolution`` R with occupancy at 2R and 4R and ``--views`` RGBA renders each. The validation
   fraction is chosen from the names' split hashes so that exactly 2-4 meshes (15 %, at least 2, at most 4, always
   leaving 2 for training) are validation shapes; no model ever trains on them.
2. ``runs/vae``: the SparseFlex VAE (``--vae-config``, default ``small``; latent R -> output 4R), trained by
   rendering losses with the recipe of ``benchmarks/train_vae_cpu.py`` (peak lr 1e-3, 2 views of 96 px per item).
3. ``runs/structure_vae``: the structure VAE on the R^3 occupancy of the latent voxels (``--flow-config``).
4. ``runs/structure_flow``: the structure flow on that VAE's R/4 latent, conditioned on the renders.
5. ``latents/``, ``runs/slat_flow``: every item encoded once by the VAE (``sparseflex.data.latents``), then the SLat
   flow on those latents.
6. ``pipeline.json``: the generator file (``sparseflex.pipelines.generate.save_pipeline``).
7. Evaluation (``--eval-only`` runs this alone on an existing ``--out``).

Budget: ``--minutes`` M is split in fixed proportions: VAE 40 %, structure VAE 10 %, structure flow 15 %, SLat flow
20 %; the remaining 15 % is the nominal share of the stages with a fixed amount of work (preparing, encoding,
generating and evaluating), which are never cut short: their measured time is reported beside the budget. Each
training sizes its warmup and cosine schedule from the wall time of its first 5 steps, and again after every 2 minutes
of training, so that the schedule ends with its budget; it stops at the budget.

Evaluation, per (image, shape) pair, in the canonical frame (the ground truth's normalisation): (a) the training
shapes from ``--train-views`` NEW renders each (another seed than preparing used: views no model saw), (b) the
validation shapes from ``--val-views`` of their prepared renders (shapes no model saw). Three methods per pair:

* ``generated``: the pipeline on the image (``--steps`` Euler steps and guidance ``--guidance`` per stage, ``--seed``);
* ``VAE rec.``: the VAE decoding the shape's own latent (the SLat flow's training target): the ceiling of any
  generator on this VAE (its structure is the true one, so its structure IoU is 1 by construction);
* ``retrieval``: the training shape whose prepared render has the nearest image tokens (cosine of the mean token of
  the same frozen image encoder) to the input's, its ground-truth mesh taken as the answer. On (a) it may find the
  shape itself: that baseline then scores the ground truth, which a generator can only match.

Metrics: structure IoU of the voxels (generated structure, true latent voxels of the retrieved shape) against the
shape's latent voxels at R; Chamfer (x10^4), F-score@0.01 and @0.02 (percent) and normal consistency of the mesh
(``sparseflex.eval.metrics.mesh_metrics``, point-to-surface, ``--metrics-points`` samples; the ground truth against
itself is the reported ceiling); silhouette IoU and mean normal angle error (degrees, over pixels both masks cover;
camera-facing normals, so open surfaces score fairly) of renders at the input camera and at 3 novel views (the input
camera turned by 90, 180 and 270 degrees about its own up axis around the object). An empty generation counts 0 for
IoUs and F-scores; Chamfer, normal consistency and angle errors are averaged over the non-empty ones (the count of
empty ones is printed).

Outputs: ``results.json`` and ``results.md`` (per pair and group means: train-unseen-view vs validation; generated vs
VAE reconstruction vs retrieval; stage timings; sampling seconds per stage with 50 Euler steps each: the median over
the evaluation's generations, or one generation timed alone when ``--steps`` is not 50), ``grid_train.png`` and
``grid_val.png`` (input | generated | ground truth | retrieval | VAE rec., normal renders at the input view),
``losses.png`` (the four training loss curves side by side), ``generated/*.ply``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from sparseflex.data import manifest
from sparseflex.data.dataset import PreparedDataset
from sparseflex.data.latents import LatentDataset, encode_dataset
from sparseflex.data.mesh import Mesh, save_mesh
from sparseflex.data.prepare import (PrepareConfig, conditioning_views, item_seed, list_sources, prepare_dataset,
                                     read_config, shaded_images)
from sparseflex.errors import InputError
from sparseflex.eval.metrics import mesh_metrics
from sparseflex.io import write_atomic
from sparseflex.models.image_encoder import image_tokens
from sparseflex.models.structure_vae import get_structure_vae_config, iou, occupancy_grid
from sparseflex.pipelines.generate import ImageTo3DPipeline, save_pipeline
from sparseflex.pipelines.reconstruct import Latent, decode_latent
from sparseflex.render.camera import CUBE_RADIUS, Camera, cat_cameras, look_at
from sparseflex.render.images import image_grid, normal_to_rgb, save_png
from sparseflex.render.maps import render
from sparseflex.train.config import TrainConfig, load_config
from sparseflex.train.tasks import build_task, open_dataset
from sparseflex.train.trainer import Trainer, load_checkpoint

ROOT = Path(__file__).resolve().parents[2] / "shared/data/meshes"
#: Shares of --minutes per training stage; the rest (15 %) is the nominal share of the fixed-work stages.
SHARES = {"vae": 0.40, "structure_vae": 0.10, "structure_flow": 0.15, "slat_flow": 0.20}
TASKS = {"vae": "vae", "structure_vae": "structure-vae", "structure_flow": "structure-flow", "slat_flow": "slat-flow"}
CALIBRATION_STEPS = 5
#: Seconds of training between two records of the time spent (state.json).
RECORD_EVERY = 120
THRESHOLDS = (0.01, 0.02)
METHODS = ("generated", "VAE rec.", "retrieval")
GROUPS = {"train": "train shapes, unseen views", "val": "validation shapes"}
NOVEL_ANGLES = (90.0, 180.0, 270.0)
#: Columns of the tables: key, header, format.
COLUMNS = (("structure_iou", "IoU", "{:.3f}"), ("chamfer", "CD", "{:.2f}"), ("fscore@0.01", "F@.01", "{:.1f}"),
           ("fscore@0.02", "F@.02", "{:.1f}"), ("normal_consistency", "NC", "{:.3f}"),
           ("sil_iou_input", "silIoU in", "{:.3f}"), ("sil_iou_novel", "silIoU nov", "{:.3f}"),
           ("normal_err_input", "nErr in", "{:.1f}"), ("normal_err_novel", "nErr nov", "{:.1f}"))
#: Scores an empty prediction gets 0 for (the others are left out of its group's mean).
ZERO_WHEN_EMPTY = ("structure_iou", "fscore@0.01", "fscore@0.02", "sil_iou_input", "sil_iou_novel")


def log(text: str) -> None:
    print(text, flush=True)


def short(name: str) -> str:
    """``closed__ajc_spot.obj`` -> ``ajc_spot``."""
    return Path(name.split("__")[-1]).stem


# -- state ------------------------------------------------------------------------------------------------------------

class State:
    """``OUT/state.json``: the settings the folder was made with, and per stage its seconds, steps and whether it is
    finished (so a second run skips it, or resumes it for what is left of its budget)."""

    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"settings": {}, "stages": {}}

    def check_settings(self, settings: dict) -> None:
        """Record the settings, or refuse ones that differ from those the folder's data and models were made with."""
        found = self.data["settings"]
        diff = [k for k in settings if k in found and found[k] != settings[k]]
        if diff:
            raise SystemExit(f"error: {self.path.parent} was made with other settings "
                             f"({', '.join(f'{k}={found[k]!r}' for k in diff)}); use another --out or the same")
        found.update(settings)
        self.save()

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {})

    def save(self) -> None:
        write_atomic(self.path, (json.dumps(self.data, indent=1) + "\n").encode())


# -- 1. data ----------------------------------------------------------------------------------------------------------

def select_meshes(root: Path, count: int | None) -> list[str]:
    """Relative paths of ``count`` meshes under ``root``, taken in turn from each group folder (sorted), so a subset
    mixes closed, open and interior shapes."""
    groups: dict[str, list[str]] = {}
    for s in list_sources(root):
        rel = s.path.relative_to(root).as_posix()
        groups.setdefault(rel.split("/")[0] if "/" in rel else "", []).append(rel)
    order = []
    for k in range(max(len(v) for v in groups.values())):
        order += [v[k] for v in groups.values() if k < len(v)]
    return order if count is None else order[:count]


def link_meshes(root: Path, selected: list[str], folder: Path) -> None:
    """Symbolic links to the selected meshes, keeping their group folders, so the items' names are those of
    ``--root`` and a subset is prepared like the whole set."""
    for rel in selected:
        link = folder / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to((root / rel).resolve())


def validation_fraction(names: list[str], seed: int) -> float:
    """A ``val_fraction`` that puts exactly k of ``names`` in the validation split (k = 15 % of them, at least 2, at
    most 4, leaving at least 2 for training): midway between the k-th and (k+1)-th smallest split hash."""
    n = len(names)
    k = min(max(2, round(0.15 * n)), 4, n - 2)
    u = sorted(manifest.stable_unit(f"split:{seed}:{name}") for name in names)
    return (u[k - 1] + u[k]) / 2


def prepare(args, out: Path, state: State) -> Path:
    root = Path(args.root)
    selected = select_meshes(root, args.meshes)
    if len(selected) < 4:
        raise SystemExit(f"error: need at least 4 meshes (2 to train, 2 to validate); {root} gives {len(selected)}")
    names = [rel.replace("/", "__") for rel in selected]
    state.check_settings({"meshes": names, "resolution": args.resolution, "views": args.views,
                          "image_size": args.image_size, "seed": args.seed, "vae_config": args.vae_config,
                          "flow_config": args.flow_config, "prepare_points": args.prepare_points})
    link_meshes(root, selected, out / "meshes")
    data = out / "prepared"
    st = state.stage("prepare")
    start = time.monotonic()
    config = PrepareConfig(points=args.prepare_points, resolution=args.resolution, levels=2, views=args.views,
                           image_size=args.image_size, seed=args.seed,
                           val_fraction=validation_fraction(names, args.seed))
    result = prepare_dataset(out / "meshes", data, config, workers=args.workers,
                             log=lambda text: log(f"  {text}"))
    if result.prepared or "seconds" not in st:
        st["seconds"] = st.get("seconds", 0.0) + time.monotonic() - start
    records = manifest.read_manifest(data)
    st.update(done=True, train=sum(r["split"] == "train" for r in records),
              val=sum(r["split"] == "val" for r in records), failed=result.failed)
    state.save()
    log(f"  {st['train']} training and {st['val']} validation shapes in {data}")
    return data


# -- 2-5. training ----------------------------------------------------------------------------------------------------

def overrides(args, stage: str, structure_vae: Path | None) -> list[str]:
    """The changes to each task's preset: sizes fitted to the latent resolution R, a short run's learning rate and
    checkpoints often enough to resume without losing much."""
    r = args.resolution
    common = [f"lr={args.lr}", f"seed={args.seed}", f"steps={10 ** 7}"]
    if stage == "vae":
        # benchmarks/train_vae_cpu.py's recipe: 2 views of 96 px, batch 1
        return common + [f"model_overrides={json.dumps({'latent_resolution': r})}", "image_size=96",
                         "views_per_item=2", "batch_size=1", "checkpoint_every=25"]
    if stage == "structure_vae":
        return common + [f"model_overrides={json.dumps({'resolution': r})}", "checkpoint_every=200"]
    if stage == "structure_flow":
        factor = get_structure_vae_config(args.flow_config).downsample_factor
        return common + [f"model_overrides={json.dumps({'resolution': r // factor})}", "checkpoint_every=200",
                         f"flow.structure_vae={structure_vae.resolve()}"]
    return common + [f"model_overrides={json.dumps({'resolution': r})}", "checkpoint_every=200"]


def train(args, out: Path, state: State, stage: str, data: Path, structure_vae: Path | None = None) -> Path:
    """Train one model for its share of the budget into ``OUT/runs/STAGE``; skipped when finished, resumed when
    interrupted."""
    run_dir = out / "runs" / stage
    ckpt = run_dir / "checkpoint.pt"
    st = state.stage(stage)
    budget = SHARES[stage] * args.minutes * 60
    if st.get("done") and ckpt.exists():
        log(f"  finished earlier ({st['steps']} steps in {st['seconds']:.0f} s): skipped (to train it again, "
            f"delete {run_dir} and every output made after it)")
        return ckpt
    task_name = TASKS[stage]
    resume = ckpt.exists()
    if resume:  # the run's own config, with the schedule sized when it started
        config = TrainConfig.from_dict(load_checkpoint(ckpt)["config"])
        config.steps = st.get("planned_steps", config.steps)
    else:
        preset = args.vae_config if stage == "vae" else args.flow_config
        config = load_config(preset, task_name).override(overrides(args, stage, structure_vae))
        st.clear()
    dataset = open_dataset(config, data, "train")
    trainer = Trainer(build_task(config, dataset), dataset, config, run_dir, device="cpu", resume=resume, quiet=True)
    st["budget"] = budget
    clock = [time.monotonic()]

    def record() -> float:
        """Add the time since the last record to the stage's seconds and save the state; the seconds left."""
        now = time.monotonic()
        st["seconds"] = st.get("seconds", 0.0) + now - clock[0]
        clock[0] = now
        st["steps"] = trainer.step
        history = trainer.history()
        if history:
            st["seconds_per_step"] = statistics.median(r["seconds"] for r in history)
            st["final_loss"] = statistics.fmean(r["loss"] for r in history[-20:])
        state.save()
        return budget - st["seconds"]

    try:
        if not resume:
            trainer.run(until=CALIBRATION_STEPS)
            calibration = time.monotonic() - clock[0]
            t0 = time.monotonic()
            trainer.save_checkpoint()  # timed alone: run() ends with one, which would count as a step's time
            # wall time, not the steps' own: loading and collating the items counts against the budget too
            per_step = max(calibration - (time.monotonic() - t0), 1e-3) / max(trainer.step, 1)
            remaining = record()
            # the scheduler reads config.steps and warmup_steps at every step: sizing them now fits the warmup and
            # the cosine decay into the budget (a preset's warmup of 200 steps would outlast a short run)
            steps = max(CALIBRATION_STEPS + 1, trainer.step + int(remaining / per_step))
            trainer.config.steps = st["planned_steps"] = steps
            trainer.config.warmup_steps = min(trainer.config.warmup_steps, max(CALIBRATION_STEPS, steps // 10))
            log(f"  {len(dataset)} training items, {per_step:.3f} s/step -> about {steps} steps in {budget:.0f} s")
        else:
            remaining = budget - st.get("seconds", 0.0)
            log(f"  resuming at step {trainer.step} of about {trainer.config.steps}, {max(remaining, 0):.0f} s left")
        # in slices, recording the time spent after each: a run killed outright resumes with what is left of its
        # budget, give or take one slice
        while remaining > 0 and trainer.step < trainer.config.steps:
            first, t0 = trainer.step, time.monotonic()
            trainer.run(seconds=min(remaining, RECORD_EVERY))
            rate = (time.monotonic() - t0) / max(trainer.step - first, 1)
            remaining = record()
            if remaining > 0 and trainer.step - first >= 20:
                # a whole slice measures the pace better than the first steps (and includes the checkpoints):
                # resize the schedule so that it still ends with the budget
                trainer.config.steps = st["planned_steps"] = trainer.step + max(int(remaining / rate), 1)
        st["done"] = True
    finally:
        record()
    log(f"  {trainer.step} steps in {st['seconds']:.0f} s (budget {budget:.0f} s), "
        f"loss (mean of the last 20) {st.get('final_loss', float('nan')):.4g}")
    return ckpt


def encode(out: Path, state: State, data: Path, vae_ckpt: Path) -> Path:
    latents = out / "latents"
    st = state.stage("encode")
    start = time.monotonic()
    result = encode_dataset(data, vae_ckpt, latents, device="cpu", batch_size=4, progress=False,
                            log=lambda text: log(f"  {text}"))
    if result.encoded or "seconds" not in st:
        st["seconds"] = st.get("seconds", 0.0) + time.monotonic() - start
    st["done"] = True
    state.save()
    return latents


# -- 7. evaluation ----------------------------------------------------------------------------------------------------

def mean_token(encoder, image: np.ndarray) -> torch.Tensor:
    """The mean of an image's conditioning tokens, unit length: the retrieval key."""
    t = image_tokens(encoder, [image])[0].mean(0)
    return t / t.norm().clamp(min=1e-12)


def view_cameras(camera: Camera) -> Camera:
    """The input camera and 3 novel ones: the input's eye turned about the camera's own up axis (through the
    object's centre, where every camera of the data aims) by :data:`NOVEL_ANGLES`. Clip planes enclose the whole
    unit cube, so a prediction larger than the ground truth is never cut."""
    E = camera.extrinsics[0].double()
    eye = camera.centers()[0].double()
    up = -E[1, :3]  # image y points down
    dist = float(eye.norm())
    eyes = [eye]
    for angle in NOVEL_ANGLES:
        a = math.radians(angle)
        # Rodrigues' rotation of the eye about the unit axis `up`
        eyes.append(eye * math.cos(a) + torch.cross(up, eye, dim=0) * math.sin(a) + up * (up @ eye) * (1 - math.cos(a)))
    cams = []
    for e in eyes:
        extr = look_at(e[None], torch.zeros(1, 3, dtype=torch.float64), up=tuple(up.tolist()))
        cams.append(Camera(camera.K[:1].double(), extr, camera.width, camera.height,
                           max(dist - 1.1 * CUBE_RADIUS, 1e-3), dist + 1.1 * CUBE_RADIUS))
    return cat_cameras(cams).to(dtype=torch.float32)


def render_maps(mesh: Mesh | None, cams: Camera) -> dict:
    verts = mesh.vertices.float() if mesh is not None else torch.zeros(0, 3)
    faces = mesh.faces if mesh is not None else torch.zeros(0, 3, dtype=torch.long)
    with torch.no_grad():
        maps = render(verts, faces, cams, antialias_edges=False, allow_empty=True)
    return {"mask": maps["mask"] > 0.5, "normal": maps["normal"]}


def image_scores(pred: dict, gt: dict) -> dict:
    """Silhouette IoU and mean normal angle error (degrees, over pixels both silhouettes cover) at the input view
    (index 0) and averaged over the novel views."""
    sil, err = [], []
    for b in range(len(gt["mask"])):
        p, g = pred["mask"][b], gt["mask"][b]
        union = int((p | g).sum())
        sil.append(float((p & g).sum()) / union if union else 1.0)
        both = p & g
        if both.any():
            cos = (pred["normal"][b][both] * gt["normal"][b][both]).sum(-1).clamp(-1, 1)
            err.append(float(torch.rad2deg(torch.acos(cos)).mean()))
        else:
            err.append(None)
    novel_err = [e for e in err[1:] if e is not None]
    return {"sil_iou_input": sil[0], "sil_iou_novel": statistics.fmean(sil[1:]), "normal_err_input": err[0],
            "normal_err_novel": statistics.fmean(novel_err) if novel_err else None}


def structure_iou(pred_coords: torch.Tensor | None, gt_coords: torch.Tensor, resolution: int) -> float:
    if pred_coords is None or len(pred_coords) == 0:
        return 0.0
    return float(iou(occupancy_grid(pred_coords.long(), resolution, 1), occupancy_grid(gt_coords, resolution, 1))[0])


def geometry_scores(pred: Mesh | None, gt: Mesh, args, ceiling: bool = False) -> dict:
    """CD, F-scores and NC of ``pred`` against ``gt`` (and with ``ceiling``, those of the ground truth against an
    independent sample of itself)."""
    keys = ("chamfer", "fscore@0.01", "fscore@0.02", "normal_consistency")
    empty = pred is None or len(pred.faces) == 0
    m = None
    if not empty or ceiling:  # an empty prediction still needs the shape's ceiling: the ground truth stands in
        m = mesh_metrics(gt if empty else pred, gt, num_points=args.metrics_points, thresholds=THRESHOLDS,
                         seed=args.seed, ceiling=ceiling)
    keep = {"chamfer": None, "fscore@0.01": 0.0, "fscore@0.02": 0.0, "normal_consistency": None} if empty else \
        {k: m[k] for k in keys}
    if ceiling:
        keep["ceiling"] = {k: m["ceiling"][k] for k in keep}
    return keep


def unseen_views(item: dict, name: str, count: int, seed: int, config: PrepareConfig) -> tuple[np.ndarray, Camera]:
    """``count`` new renders of a prepared shape, like its own but from another random stream than preparing
    used (views no model saw)."""
    gen = torch.Generator().manual_seed(item_seed(f"unseen:{name}", seed))
    mesh = Mesh(item["vertices"], item["faces"])
    camera = conditioning_views(mesh, count, gen, config.fov, config.image_size)
    return shaded_images(mesh, camera), camera


def composite(rgba: np.ndarray) -> np.ndarray:
    """An RGBA render (premultiplied: black where transparent) on white, uint8 RGB."""
    a = rgba[..., 3:4].astype(np.float32) / 255
    return (rgba[..., :3].astype(np.float32) + (1 - a) * 255 + 0.5).clip(0, 255).astype(np.uint8)


def evaluate(args, out: Path, state: State) -> dict:
    data, latents = out / "prepared", out / "latents"
    for need in (out / "pipeline.json", data / manifest.MANIFEST, latents / manifest.MANIFEST):
        if not need.exists():
            raise SystemExit(f"error: {need} is missing: run without --eval-only first")
    start = time.monotonic()
    pconfig = read_config(data)
    r = pconfig.resolution
    pipe = ImageTo3DPipeline.from_file(out / "pipeline.json", "cpu")
    encoder = pipe.structure.image_encoder
    prepared = PreparedDataset(data, "all", with_images=True)
    items = {rec["name"]: prepared[i] for i, rec in enumerate(prepared.records)}
    split = {rec["name"]: rec["split"] for rec in prepared.records}
    latent_ds = LatentDataset(latents, "all", with_images=False)
    latent_index = {rec["name"]: i for i, rec in enumerate(latent_ds.records)}
    train_names = [n for n in items if split[n] == "train"]
    val_names = [n for n in items if split[n] == "val"]

    # retrieval keys: every prepared render of every training shape
    keys, owners = [], []
    for n in train_names:
        for image in items[n]["images"].numpy():
            keys.append(mean_token(encoder, image))
            owners.append(n)
    keys = torch.stack(keys)

    # per shape: the ground truth, its latent voxels, the VAE's reconstruction from its own latent
    shapes = {}
    for n, item in items.items():
        gt = Mesh(item["vertices"], item["faces"])
        rec = None
        if n in latent_index:
            lat = latent_ds[latent_index[n]]
            try:
                rec = decode_latent(pipe.vae, Latent(lat["coords"], lat["feats"], lat["resolution"])).mesh
            except InputError as exc:
                log(f"  {short(n)}: the VAE decodes nothing ({exc})")
        shapes[n] = {"gt": gt, "coords": item["coords"], "vae": rec}

    pairs = []
    for n in train_names:
        images, cams = unseen_views(items[n], n, args.train_views, args.seed, pconfig)
        pairs += [{"group": "train", "shape": n, "view": k, "image": images[k], "camera": cams[k]}
                  for k in range(len(images))]
    for n in val_names:
        images, cams = items[n]["images"].numpy(), items[n]["cameras"]
        pairs += [{"group": "val", "shape": n, "view": k, "image": images[k], "camera": cams[k]}
                  for k in range(min(args.val_views, len(images)))]
    log(f"  {len(pairs)} pairs: {sum(p['group'] == 'train' for p in pairs)} unseen views of {len(train_names)} "
        f"training shapes, {sum(p['group'] == 'val' for p in pairs)} views of {len(val_names)} validation shapes")

    geometry_cache: dict[tuple, dict] = {}
    rows, pictures, sample_seconds = [], {"train": [], "val": []}, []
    (out / "generated").mkdir(exist_ok=True)
    for i, pair in enumerate(pairs):
        t0 = time.monotonic()
        n, shape = pair["shape"], shapes[pair["shape"]]
        cams = view_cameras(pair["camera"])
        gt_maps = render_maps(shape["gt"], cams)
        # generated
        try:
            res = pipe([pair["image"]], seed=args.seed, structure_steps=args.steps, slat_steps=args.steps,
                       structure_guidance=args.guidance, slat_guidance=args.guidance)[0]
            gen_mesh, gen_coords = res.mesh, res.structure
            sample_seconds.append(res.seconds)
            if len(res.mesh.faces):
                save_mesh(out / "generated" / f"{pair['group']}_{short(n)}_{pair['view']}.ply", res.mesh)
        except InputError as exc:  # an empty structure: nothing to decode
            log(f"  {short(n)} view {pair['view']}: {exc}")
            gen_mesh, gen_coords = None, None
        # retrieval
        q = mean_token(encoder, pair["image"])
        found = owners[int(torch.argmax(keys @ q))]
        methods = {"generated": (gen_mesh, gen_coords, ("generated", n, i)),
                   "VAE rec.": (shape["vae"], shape["coords"], ("vae", n)),
                   "retrieval": (shapes[found]["gt"], shapes[found]["coords"], ("retrieval", found, n))}
        row = {"group": pair["group"], "shape": n, "view": pair["view"], "retrieved": found, "methods": {}}
        maps = {}
        for method, (mesh, coords, cache_key) in methods.items():
            if cache_key not in geometry_cache:
                geometry_cache[cache_key] = geometry_scores(mesh, shape["gt"], args, ceiling=method == "VAE rec.")
            geo = dict(geometry_cache[cache_key])
            if "ceiling" in geo:
                row["ceiling"] = geo.pop("ceiling")
            maps[method] = render_maps(mesh, cams)
            row["methods"][method] = {"structure_iou": structure_iou(coords, shape["coords"], r), **geo,
                                      **image_scores(maps[method], gt_maps), "empty": mesh is None or
                                      len(mesh.faces) == 0}
        rows.append(row)
        pictures[pair["group"]].append(
            [composite(pair["image"])] + [normal_to_rgb(m["normal"][0], m["mask"][0])
                                          for m in (maps["generated"], gt_maps, maps["retrieval"], maps["VAE rec."])])
        g = row["methods"]["generated"]
        log(f"  [{i + 1}/{len(pairs)}] {pair['group']:<5} {short(n)[:18]:<18} view {pair['view']}: generated "
            f"IoU {g['structure_iou']:.2f} F@.02 {g['fscore@0.02']:.1f} silIoU {g['sil_iou_input']:.2f}; "
            f"retrieved {short(found)} ({time.monotonic() - t0:.0f} s)")

    for group, grid in pictures.items():
        if grid:
            labels = [f"{short(r_['shape'])[:12]} v{r_['view']}" for r_ in rows if r_["group"] == group]
            save_png(image_grid(grid, labels, ["input", "generated", "ground truth", "retrieval", "VAE rec."]),
                     out / f"grid_{group}.png")

    # sampling time per stage with 50 steps each (the median over this run's generations when they used 50 steps,
    # else one generation timed on its own)
    if args.steps != 50 or not sample_seconds:
        try:
            sample_seconds = [pipe([pairs[0]["image"]], seed=args.seed, structure_steps=50, slat_steps=50,
                                   structure_guidance=args.guidance, slat_guidance=args.guidance)[0].seconds]
        except InputError:
            sample_seconds = []
    timing = {k: statistics.median(s[k] for s in sample_seconds) for k in sample_seconds[0]} if sample_seconds else {}
    st = state.stage("evaluate")
    st.update(seconds=time.monotonic() - start, done=True)
    state.save()
    return {"rows": rows, "means": group_means(rows), "sampling_seconds_50_steps": timing,
            "sampling_runs": len(sample_seconds), "resolution": r, "output_resolution": pipe.resolution,
            "train_shapes": train_names, "val_shapes": val_names}


def group_means(rows: list[dict]) -> dict:
    means = {}
    for group in GROUPS:
        sub = [r for r in rows if r["group"] == group]
        if not sub:
            continue
        means[group] = {}
        for method in METHODS:
            scores = [r["methods"][method] for r in sub]
            m = {"pairs": len(scores), "empty": sum(s["empty"] for s in scores)}
            for key, _, _ in COLUMNS:
                vals = [s[key] for s in scores if s[key] is not None]
                if key in ZERO_WHEN_EMPTY:
                    vals = [s[key] or 0.0 for s in scores]
                m[key] = statistics.fmean(vals) if vals else None
            means[group][method] = m
        ceilings = [r["ceiling"] for r in sub if "ceiling" in r]
        if ceilings:
            means[group]["ceiling"] = {k: statistics.fmean(c[k] for c in ceilings) for k in ceilings[0]}
    return means


# -- reports ----------------------------------------------------------------------------------------------------------

def fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def tables(results: dict) -> tuple[list[str], list[str]]:
    """The group means and the per-pair rows as Markdown table lines."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    means = ["| group | method | pairs (empty) " + head, "|---|---|---" + sep]
    for group, per in results["means"].items():
        for method in METHODS:
            m = per[method]
            means.append(f"| {GROUPS[group]} | {method} | {m['pairs']} ({m['empty']}) | "
                         + " | ".join(fmt(m[k], f) for k, _, f in COLUMNS) + " |")
        if "ceiling" in per:
            c = per["ceiling"]
            means.append(f"| {GROUPS[group]} | ground truth vs itself (metric ceiling) | | - | "
                         + " | ".join(fmt(c.get(k), f) for k, _, f in COLUMNS[1:5]) + " |" + " - |" * 4)
    pairs = ["| group | shape | view | method " + head, "|---|---|---|---" + sep]
    for row in results["rows"]:
        for method in METHODS:
            s = row["methods"][method]
            label = f"retrieval ({short(row['retrieved'])})" if method == "retrieval" else method
            pairs.append(f"| {row['group']} | {short(row['shape'])} | {row['view']} | {label} | "
                         + " | ".join(fmt(s[k], f) for k, _, f in COLUMNS) + " |")
    return means, pairs


def print_tables(results: dict, stages: dict) -> None:
    w = 11
    metrics = "".join(f"{h:>{w}}" for _, h, _ in COLUMNS)
    log(f"{'group':<6}{'shape':<19}{'view':>5}  {'method':<24}" + metrics)
    for row in results["rows"]:
        for method in METHODS:
            s = row["methods"][method]
            label = f"retrieval: {short(row['retrieved'])[:13]}" if method == "retrieval" else method
            log(f"{row['group']:<6}{short(row['shape'])[:18]:<19}{row['view']:>5}  {label:<24}"
                + "".join(f"{fmt(s[k], f):>{w}}" for k, _, f in COLUMNS))
    log("")
    log(f"{'group means (pairs, empty)':<32}{'method':<22}" + metrics)
    for group, per in results["means"].items():
        for method in METHODS:
            m = per[method]
            label = f"{group} ({m['pairs']}, {m['empty']})"
            log(f"{label:<32}{method:<22}" + "".join(f"{fmt(m[k], f):>{w}}" for k, _, f in COLUMNS))
        if "ceiling" in per:
            c = per["ceiling"]
            log(f"{group:<32}{'metric ceiling (GT)':<22}{'-':>{w}}"
                + "".join(f"{fmt(c.get(k), f):>{w}}" for k, _, f in COLUMNS[1:5]))
    log("")
    log(f"{'stage':<16}{'budget s':>10}{'seconds':>10}{'steps':>8}{'s/step':>9}")
    for name, st in stages.items():
        log(f"{name:<16}{fmt(st.get('budget'), '{:.0f}'):>10}{fmt(st.get('seconds'), '{:.0f}'):>10}"
            f"{st.get('steps', '-'):>8}{fmt(st.get('seconds_per_step'), '{:.3f}'):>9}")


def loss_figure(out: Path) -> Path | None:
    """The four training runs' loss curves side by side, from their metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.4), dpi=100)
    for ax, stage in zip(axes, TASKS):
        path = out / "runs" / stage / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        ax.set_title(TASKS[stage])
        ax.set_xlabel("step")
        if not records:
            continue
        steps = [r["step"] for r in records]
        loss = torch.tensor([r["loss"] for r in records])
        ax.plot(steps, loss.tolist(), lw=0.6, alpha=0.35, color="k")
        k = min(25, len(records))
        smooth = loss.unfold(0, k, 1).mean(1)
        ax.plot(steps[k - 1:], smooth.tolist(), lw=1.5, color="k", label=f"mean of {k}")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    path = out / "losses.png"
    fig.savefig(path)
    plt.close(fig)
    return path


FIXED_WORK = ("prepare", "encode", "pipeline", "evaluate")


def report(args, out: Path, state: State, results: dict) -> None:
    stages, settings = state.data["stages"], state.data["settings"]
    minutes = state.data.get("minutes", args.minutes)
    timing = ["| stage | budget s | seconds | steps | s/step (median) | loss (mean of the last 20 steps) |",
              "|---|---|---|---|---|---|"]
    for name in ("prepare", *TASKS, "encode", "pipeline", "evaluate"):
        st = stages.get(name, {})
        timing.append(f"| {name} | {fmt(st.get('budget'), '{:.0f}')} | {fmt(st.get('seconds'), '{:.0f}')} | "
                      f"{st.get('steps', '-')} | {fmt(st.get('seconds_per_step'), '{:.3f}')} | "
                      f"{fmt(st.get('final_loss'), '{:.4g}')} |")
    total = sum(st.get("seconds", 0.0) for st in stages.values())
    fixed = sum(stages.get(name, {}).get("seconds", 0.0) for name in FIXED_WORK)
    sampling = results["sampling_seconds_50_steps"]
    means, pairs = tables(results)
    md = [f"# Image-to-3D on the CPU: {minutes:g} minutes", "",
          (f"`python benchmarks/image_to_3d_cpu.py --minutes {minutes:g} --resolution {settings['resolution']}"
           f" --meshes {len(settings['meshes'])} --seed {settings['seed']}` "
           f"(VAE `{settings['vae_config']}`, structure VAE and flows `{settings['flow_config']}`; structures at "
           f"{results['resolution']}^3, meshes at {results['output_resolution']}^3; {len(results['train_shapes'])} "
           f"training and {len(results['val_shapes'])} validation shapes; evaluation: {args.steps} Euler steps and "
           f"guidance {args.guidance:g} per stage, seed {args.seed}, {args.metrics_points:,} points per surface). "
           f"Total {total / 60:.1f} min, of which the fixed-work stages (prepare, encode, pipeline, evaluate) "
           f"{fixed / 60:.1f} min against their nominal 15 % ({0.15 * minutes:.1f} min)."), "",
          "## Stages", "", *timing, "",
          f"Sampling time per stage with 50 Euler steps each (median of {results['sampling_runs']} generations, "
          "seconds): " + ", ".join(f"{k} {v:.2f}" for k, v in sampling.items()), "",
          "## Group means", "",
          ("IoU: structure IoU at the latent resolution; CD x10^4; F-scores in %; NC normal consistency; silIoU: "
           "silhouette IoU; nErr: mean normal angle error in degrees; 'in': at the input camera, 'nov': mean of 3 "
           "novel views. An empty generation counts 0 in IoUs and F-scores and is left out of CD, NC and nErr. "
           "VAE rec. decodes the shape's true latent (its structure IoU is 1 by construction); retrieval answers "
           "with the ground truth of the training shape whose render's image tokens are nearest."), "",
          *means, "", "## Per pair", "", *pairs, "",
          "Pictures: `grid_train.png`, `grid_val.png` (normal renders at the input view), `losses.png`."]
    write_atomic(out / "results.md", ("\n".join(md) + "\n").encode())
    doc = {"settings": settings, "minutes": minutes, "evaluation": {"steps": args.steps, "guidance": args.guidance,
                                                                      "seed": args.seed,
                                                                      "metrics_points": args.metrics_points},
           "stages": stages, **results}
    write_atomic(out / "results.json", (json.dumps(doc, indent=1) + "\n").encode())


# -- main -------------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=120.0, help="total budget (default 120)")
    ap.add_argument("--out", default="out/image_to_3d_cpu")
    ap.add_argument("--root", default=str(ROOT), help="folder of mesh groups (default ../shared/data/meshes)")
    ap.add_argument("--meshes", type=int, default=None, help="use only this many meshes (in turn from each group)")
    ap.add_argument("--resolution", type=int, default=16, choices=(16, 32), help="latent resolution R (default 16)")
    ap.add_argument("--views", type=int, default=8, help="prepared renders per mesh (default 8)")
    ap.add_argument("--image-size", type=int, default=128, help="size of the renders (default 128)")
    ap.add_argument("--prepare-points", type=int, default=65_536)
    ap.add_argument("--vae-config", default="small", help="VAE training preset (default small)")
    ap.add_argument("--flow-config", default="small",
                    help="preset of the structure VAE and both flows (default small)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every stage (a short run wants "
                                                           "more than the presets' 1e-4 / 3e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=50, help="Euler steps per sampling stage (default 50)")
    ap.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance per stage (default 3.5)")
    ap.add_argument("--train-views", type=int, default=1, help="unseen renders per training shape (default 1)")
    ap.add_argument("--val-views", type=int, default=2, help="renders per validation shape (default 2)")
    ap.add_argument("--metrics-points", type=int, default=100_000, help="surface samples per mesh (default 100k)")
    ap.add_argument("--workers", type=int, default=1, help="processes preparing meshes (default 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's own choice)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the models in --out as they are")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.resolution % get_structure_vae_config(args.flow_config).downsample_factor:
        raise SystemExit("error: --resolution must be a multiple of the structure VAE's downsampling")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = State(out)
    clock = time.monotonic()

    def header(text: str) -> None:
        log(f"[{(time.monotonic() - clock) / 60:5.1f} min] {text}")

    if not args.eval_only:
        state.data["minutes"] = args.minutes
        header("1. prepare")
        data = prepare(args, out, state)
        header("2. train the VAE")
        vae = train(args, out, state, "vae", data)
        header("3. train the structure VAE")
        svae = train(args, out, state, "structure_vae", data)
        header("4. train the structure flow")
        sflow = train(args, out, state, "structure_flow", data, structure_vae=svae)
        header("5. encode the latents, train the SLat flow")
        latents = encode(out, state, data, vae)
        slat = train(args, out, state, "slat_flow", latents)
        header("6. write the pipeline")
        t0 = time.monotonic()
        save_pipeline(out / "pipeline.json", sflow, slat)
        state.stage("pipeline").update(seconds=time.monotonic() - t0, done=True)
        state.save()
    header("7. generate and evaluate")
    results = evaluate(args, out, state)
    loss_figure(out)
    print_tables(results, state.data["stages"])
    report(args, out, state, results)
    if results["sampling_seconds_50_steps"]:
        log("sampling, 50 steps per stage: " + ", ".join(f"{k} {v:.2f} s"
                                                        for k, v in results["sampling_seconds_50_steps"].items()))
    header(f"done: {out / 'results.md'}, {out / 'results.json'}, grid_train.png, grid_val.png, losses.png")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: run the same command again to resume (finished stages are skipped, an "
                         "interrupted training continues from its checkpoint)") from None

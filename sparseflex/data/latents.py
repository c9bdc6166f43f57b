"""VAE latents as data: one shape's latent and its file (:class:`Latent`, :func:`save_latent`, :func:`load_latent`), and
the latent dataset of the structured-latent flow: every prepared item encoded once by a trained VAE, the per-channel
statistics the flow normalises with, and a map-style dataset over the stored latents.

The flow learns the VAE's posterior mean on the item's active voxels, so training it never runs the encoder:
:func:`encode_dataset` encodes each prepared item from its own stored points, normals and voxels (exactly what the
VAE was trained on) and writes a small file per item. Layout of a latent folder::

    OUT/config.json                  format, the prepared folder (absolute path), the VAE checkpoint (path, sha256,
                                     model config), latent resolution and channels, whether logvar is stored
    OUT/items/<name>.safetensors     coords int16 [N, 3] (latent resolution), feats float32 [N, C] = posterior
                                     mean; with ``logvar`` also logvar float16 [N, C]; a `sparseflex-latent-1`
                                     file, so :func:`load_latent` reads it
    OUT/parts/<shard>.jsonl          per-shard record logs, merged into the manifest (see :mod:`.manifest`)
    OUT/manifest.jsonl               name, file, prepared (the item's file inside the prepared folder), voxels, split
                                     (copied from the prepared manifest)
    OUT/failures.json                items that could not be encoded, with the reason
    OUT/stats.json                   per-channel mean / std / count over the train split (:func:`latent_stats`)

The log-variance is optional because the flow learns the mean; a trainer that wants posterior samples stores it,
in float16 (its error, under 0.1 % of the standard deviation exp(logvar / 2), is far below the noise it scales).
Runs are resumable and sharded like ``data prepare`` (same locks, record logs and atomic writes); a resume with
another checkpoint (by sha256 of the file) is refused, so latents of two VAEs never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import InputError, OptionError, check_range
from ..io import atomic_path, write_atomic
from . import manifest
from .dataset import SPLITS
from .item import dequantize_points
from .mesh import Normalization
from .prepare import CONFIG, check_out_dir, in_use, read_config, remove_temporaries, select_shard, shard_lock
from .workers import describe

#: ``format`` of a latent file's metadata.
LATENT_FORMAT = "sparseflex-latent-1"
#: ``format`` of a latent folder's config.json.
LATENTS_FORMAT = "sparseflex-latents-1"
STATS = "stats.json"
SUFFIX = ".safetensors"
#: Smallest standard deviation normalisation divides by (a channel the VAE leaves constant would give inf).
STD_FLOOR = 1e-6


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB blocks: the fingerprint of a VAE checkpoint."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_latent_config(root: str | os.PathLike) -> dict:
    """The config.json of a latent folder (:class:`~sparseflex.errors.InputError` for any other folder)."""
    path = Path(root) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise InputError(f"{root}: not a latent folder (no readable {CONFIG}; run `sparseflex data encode`)") from None
    if not isinstance(config, dict) or config.get("format") != LATENTS_FORMAT:
        raise InputError(f"{root}: not a latent folder (its {CONFIG} is not from `sparseflex data encode`)")
    return config


@dataclass
class Latent:
    """A shape's latent: voxels ``coords [N, 3]`` at ``resolution`` with ``feats [N, C]``, and the normalisation
    ``transform`` of its source mesh (``None``: the latent lives in the normalised cube)."""
    coords: torch.Tensor
    feats: torch.Tensor
    resolution: int
    transform: Normalization | None = None


def save_latent(path: str | os.PathLike, latent: Latent, logvar: torch.Tensor | None = None) -> Path:
    """Write a latent as safetensors, atomically: ``coords`` (int16 below 32,768, else int32), ``feats`` float32,
    the source's normalisation when known, and optionally the posterior ``logvar`` (float16)."""
    from safetensors.torch import save_file
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    index_type = torch.int16 if latent.resolution <= 32767 else torch.int32
    tensors = {"coords": latent.coords.detach().cpu().to(index_type).contiguous(),
               "feats": latent.feats.detach().cpu().float().contiguous()}
    if logvar is not None:
        tensors["logvar"] = logvar.detach().cpu().to(torch.float16).contiguous()
    metadata = {"format": LATENT_FORMAT, "resolution": str(latent.resolution)}
    if latent.transform is not None:
        tensors["center"] = latent.transform.center.detach().cpu().double().reshape(3)
        metadata["scale"] = json.dumps(latent.transform.scale)
    with atomic_path(p) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return p


def load_latent(path: str | os.PathLike) -> Latent:
    """Read a latent written by :func:`save_latent` (one-line InputError for anything else)."""
    from safetensors import safe_open
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such latent file")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - the file cannot be used, whatever the reason
        raise InputError(f"{p}: not a readable latent file ({exc})".splitlines()[0]) from None
    if metadata.get("format") != LATENT_FORMAT or "coords" not in tensors or "feats" not in tensors:
        raise InputError(f"{p}: not a SparseFlex latent (written by `sparseflex encode`)")
    coords, feats = tensors["coords"].long(), tensors["feats"]
    r = int(metadata.get("resolution", 0))
    if coords.dim() != 2 or coords.shape[1] != 3 or len(coords) != len(feats) or r < 1:
        raise InputError(f"{p}: malformed latent (coords {tuple(coords.shape)}, feats {tuple(feats.shape)})")
    if len(coords) and (int(coords.min()) < 0 or int(coords.max()) >= r):
        raise InputError(f"{p}: latent voxel coordinates outside [0, {r})")
    transform = None
    if "center" in tensors:
        transform = Normalization(tensors["center"].float(), float(json.loads(metadata["scale"])))
    return Latent(coords, feats, r, transform)


# -- encoding ---------------------------------------------------------------------------------------------------------

@dataclass
class EncodeResult:
    encoded: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list = field(default_factory=list)   # records of the failures of this run


def encoder_inputs(path: Path) -> dict:
    """The arrays of a prepared item that the encoder reads (``points``, ``normals``, ``coords``, ``resolution``),
    as :func:`~sparseflex.data.item.load_item` decodes them, without expanding the occupancy or reading the mesh."""
    with _open_item(path) as z:
        item = {"points": dequantize_points(z["points_q"]),
                "normals": torch.from_numpy(z["normals"].astype(np.float32)),
                "coords": torch.from_numpy(z["coords"].astype(np.int64)),
                "resolution": int(z["resolution"])}
    if len(item["coords"]) == 0:
        raise InputError(f"{path}: the item has no active voxels")
    return item


@contextmanager
def _open_item(path: Path):
    """``np.load`` of a prepared item (no pickles), whose failures are one-line :class:`InputError` s (numpy's own
    message for a file that is no zip archive suggests loading it unsafely)."""
    if not path.is_file():
        raise InputError(f"{path}: prepared item not found")
    try:
        with np.load(path) as z:
            yield z
    except KeyError as exc:
        raise InputError(f"{path}: a prepared item without the array {exc}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise InputError(f"{path}: not a readable prepared item (a .npz of `sparseflex data prepare`)") from None


@torch.no_grad()
def encode_items(model, items: list[dict], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, logvar) ``[N_i, C]`` per item, on the CPU, from one batched call of ``model.encode`` on the items'
    own points, normals and voxels."""
    resolution = items[0]["resolution"]
    if any(it["resolution"] != resolution for it in items):
        raise InputError("items prepared at different resolutions cannot share a batch")
    points = torch.cat([it["points"] for it in items]).to(device)
    normals = torch.cat([it["normals"] for it in items]).to(device)
    point_batch = torch.cat([torch.full((len(it["points"]),), i, dtype=torch.long)
                             for i, it in enumerate(items)]).to(device)
    coords = torch.cat([torch.cat([it["coords"].new_full((len(it["coords"]), 1), i), it["coords"]], dim=1)
                        for i, it in enumerate(items)]).to(device)
    mean, logvar = model.encode(points, normals, point_batch, coords, resolution)
    return [(mean.feats[rows].float().cpu(), logvar.feats[rows].float().cpu()) for rows in mean.layout]


def _check_config(root: Path, wanted: dict) -> None:
    """Record the run's settings in ``root/config.json``, or check that an earlier run used the same checkpoint,
    prepared folder and storage."""
    path = root / CONFIG
    if not path.exists():
        write_atomic(path, (json.dumps(wanted, indent=1, sort_keys=True) + "\n").encode())
        return
    found = read_latent_config(root)
    if found.get("checkpoint_sha256") != wanted["checkpoint_sha256"]:
        raise OptionError(f"{root} holds latents of another VAE checkpoint ({found.get('checkpoint')}, sha256 "
                          f"{str(found.get('checkpoint_sha256'))[:12]}...) than {wanted['checkpoint']} (sha256 "
                          f"{wanted['checkpoint_sha256'][:12]}...); use another output folder or --overwrite")
    diff = [k for k in ("prepared", "resolution", "channels", "logvar") if found.get(k) != wanted[k]]
    if diff:
        raise OptionError(f"{root} was encoded with other settings ("
                          f"{', '.join(f'{k}={found.get(k)!r}' for k in diff)}); use another output folder, the same "
                          f"settings or --overwrite")


def _clear(root: Path) -> None:
    """Remove an earlier run's results from the latent folder ``root`` (never anything else that lies there)."""
    for name in (manifest.ITEMS, manifest.PARTS):
        shutil.rmtree(root / name, ignore_errors=True)
    for name in (CONFIG, manifest.MANIFEST, manifest.FAILURES, STATS):
        (root / name).unlink(missing_ok=True)


def encode_dataset(prepared_root: str | os.PathLike, vae_checkpoint: str | os.PathLike, out_root: str | os.PathLike,
                   shard: tuple[int, int] = (0, 1), device=None, batch_size: int = 4, logvar: bool = False,
                   overwrite: bool = False, progress: bool = True,
                   log: Callable[[str], None] = print) -> EncodeResult:
    """Encode the prepared items of this shard (items ``I, I+N, ...`` of the prepared manifest, sorted by name)
    into ``out_root``; see the module docstring for the layout.

    ``batch_size`` items share an encoder call; ``device`` defaults to CUDA when available; ``logvar`` also stores
    the posterior log-variance; ``overwrite`` first removes an earlier run's results (refused while another run
    uses the folder). Items an earlier run encoded are skipped (failed ones are tried again); an item that cannot
    be encoded is recorded in failures.json, never raised. Every check (the prepared folder, the checkpoint, the
    output folder and its earlier settings) happens before anything is written. Ends by merging the manifest of
    all shards and writing the train split's statistics to stats.json.
    """
    from tqdm import tqdm

    from ..models.checkpoint import load_model

    check_range("--batch-size", batch_size, 1)
    prepared = Path(prepared_root)
    pconfig = read_config(prepared)
    if not (prepared / manifest.MANIFEST).exists():
        raise InputError(f"{prepared}: no {manifest.MANIFEST} (run `sparseflex data prepare` first)")
    sources = select_shard(manifest.read_manifest(prepared), *shard)
    root = check_out_dir(out_root, what="a latent folder")
    if (root / CONFIG).exists():
        read_latent_config(root)  # a prepared folder (or anything else with a config.json) is never written into
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(vae_checkpoint, device=device)  # refuses checkpoints of other models
    wanted = {"format": LATENTS_FORMAT, "prepared": str(prepared.resolve()),
              "checkpoint": str(Path(vae_checkpoint).resolve()), "checkpoint_sha256": checkpoint_sha256(vae_checkpoint),
              "vae_config": model.config.to_dict(), "resolution": pconfig.resolution,
              "channels": model.config.latent_channels, "logvar": bool(logvar)}
    if overwrite and in_use(root):
        raise OptionError(f"{root} is in use by another run; --overwrite would delete its results")
    if not overwrite and (root / CONFIG).exists():
        _check_config(root, wanted)
    root.mkdir(parents=True, exist_ok=True)
    with shard_lock(root, shard, "encode"):
        if overwrite:
            _clear(root)
        _check_config(root, wanted)
        (root / manifest.ITEMS).mkdir(exist_ok=True)
        part = manifest.part_path(root, *shard)
        earlier = manifest.read_records(root)
        todo = [s for s in sources if not (earlier.get(s["name"], {}).get("status") == "ok"
                                           and manifest.item_path(root, earlier[s["name"]]).exists())]
        remove_temporaries(root / manifest.ITEMS, {s["name"] for s in todo}, SUFFIX)  # left by a killed run
        result = EncodeResult(skipped=len(sources) - len(todo))
        if result.skipped:
            log(f"skipping {result.skipped} of {len(sources)} items encoded by an earlier run")
        try:
            with tqdm(total=len(todo), unit="item", desc="encode", disable=not progress, file=sys.stderr) as bar:
                for start in range(0, len(todo), batch_size):
                    for record in _encode_batch(model, device, prepared, root, todo[start:start + batch_size],
                                                logvar):
                        manifest.append_record(part, record)
                        if record["status"] == "ok":
                            result.encoded += 1
                        else:
                            result.failed += 1
                            result.failures.append(record)
                            log(f"{record['name']}: FAILED: {record['reason']}")
                        bar.update(1)
        finally:
            ok, failed = merge(root)
        log(f"encoded {result.encoded}, skipped {result.skipped} (already encoded), failed {result.failed}; "
            f"manifest: {len(ok)} items, {len(failed)} failures in total ({root / manifest.FAILURES})")
        if any(r["split"] == "train" for r in ok):
            stats = write_stats(root)
            log(f"latent statistics of {stats['count']:,} train voxels: {root / STATS}")
    return result


def merge(root: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Rewrite ``manifest.jsonl`` and ``failures.json`` of a latent folder from every shard's part; return both
    lists (sorted by name). Splits are the prepared folder's, recorded when each item was encoded."""
    records = manifest.read_records(Path(root))
    ok = sorted((r for r in records.values() if r["status"] == "ok"), key=lambda r: r["name"])
    failed = sorted((r for r in records.values() if r["status"] != "ok"), key=lambda r: r["name"])
    manifest.write_manifest(Path(root), ok, failed)
    return ok, failed


def _encode_batch(model, device, prepared: Path, root: Path, sources: list[dict], logvar: bool) -> list[dict]:
    """Encode and write the prepared items ``sources`` (prepared manifest records); a record per item."""
    records, loaded = [], []
    for src in sources:
        record = {"name": src["name"], "file": f"{manifest.ITEMS}/{src['name']}{SUFFIX}", "prepared": src["file"],
                  "split": src.get("split", "train")}
        try:
            out = manifest.item_path(root, record)  # an item name from the manifest must stay inside the folder
            loaded.append((record, out, encoder_inputs(manifest.item_path(prepared, src))))
        except Exception as exc:  # noqa: BLE001 - a bad item is reported, never raised
            records.append({"name": src["name"], "status": "failed", "reason": describe(exc)})
    # one call for the batch; if it fails, each item alone, so only the culprit is reported
    try:
        encoded = encode_items(model, [it for _, _, it in loaded], device) if loaded else []
    except Exception:  # noqa: BLE001
        encoded = None
    for k, (record, out, item) in enumerate(loaded):
        try:
            mean, lv = encoded[k] if encoded is not None else encode_items(model, [item], device)[0]
            if not bool(torch.isfinite(mean).all()):
                raise InputError("the encoder returned non-finite values")
            save_latent(out, Latent(item["coords"], mean, item["resolution"]), lv if logvar else None)
        except Exception as exc:  # noqa: BLE001
            records.append({"name": record["name"], "status": "failed", "reason": describe(exc)})
            continue
        records.append({**record, "status": "ok", "voxels": len(item["coords"])})
    return records


# -- statistics and normalisation -------------------------------------------------------------------------------------

def _records(root: Path, split: str) -> list[dict]:
    if split not in SPLITS:
        raise OptionError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if not (root / manifest.MANIFEST).exists():
        raise InputError(f"{root}: no {manifest.MANIFEST} (run `sparseflex data encode` first)")
    return [r for r in manifest.read_manifest(root) if split == "all" or r["split"] == split]


def latent_stats(out_root: str | os.PathLike, split: str = "train") -> dict:
    """Per-channel ``mean`` and ``std`` (population, as ``numpy.std``) of the latents over every voxel of the
    ``split`` (``train``, ``val`` or ``all``), and the voxel ``count``. Streams one item at a time, combining each
    item's float64 mean and sum of squared deviations (Chan et al.'s pairwise update: no cancellation however
    many voxels)."""
    root = Path(out_root)
    read_latent_config(root)
    count, mean, m2 = 0, None, None
    for rec in _records(root, split):
        feats = load_latent(manifest.item_path(root, rec)).feats.double()
        n = len(feats)
        if n == 0:
            continue
        m = feats.mean(0)
        if mean is None:
            mean, m2 = torch.zeros_like(m), torch.zeros_like(m)
        delta = m - mean
        total = count + n
        mean += delta * (n / total)
        m2 += ((feats - m) ** 2).sum(0) + delta ** 2 * (count * n / total)
        count = total
    if count == 0:
        raise InputError(f"{root}: no latents in the {split} split")
    return {"mean": mean.tolist(), "std": torch.sqrt(m2 / count).tolist(), "count": count}


def write_stats(out_root: str | os.PathLike) -> dict:
    """Compute the train split's statistics and write them to ``out_root/stats.json`` (with the split and the
    checkpoint's fingerprint, so a trainer can check they belong to its latents); return them."""
    root = Path(out_root)
    stats = latent_stats(root, "train")
    fingerprint = read_latent_config(root)["checkpoint_sha256"]
    write_atomic(root / STATS, (json.dumps({**stats, "split": "train", "checkpoint_sha256": fingerprint},
                                           indent=1) + "\n").encode())
    return stats


def read_stats(out_root: str | os.PathLike) -> dict:
    """The statistics of ``out_root/stats.json``."""
    path = Path(out_root) / STATS
    try:
        stats = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise InputError(f"{path}: no readable latent statistics (run `sparseflex data latent-stats`)") from None
    if not isinstance(stats, dict) or not {"mean", "std", "count"} <= set(stats):
        raise InputError(f"{path}: not latent statistics (mean, std, count)")
    return stats


def _mean_std(stats: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(stats["mean"], dtype=like.dtype, device=like.device)
    std = torch.as_tensor(stats["std"], dtype=like.dtype, device=like.device).clamp(min=STD_FLOOR)
    if like.shape[-1] != len(mean) or len(std) != len(mean):
        raise InputError(f"latent features have {like.shape[-1]} channels but the statistics {len(mean)}")
    return mean, std


def normalize_latent(feats: torch.Tensor, stats: dict) -> torch.Tensor:
    """``(feats - mean) / std`` per channel: what the flow trains on (std floored at :data:`STD_FLOOR`)."""
    mean, std = _mean_std(stats, feats)
    return (feats - mean) / std


def denormalize_latent(feats: torch.Tensor, stats: dict) -> torch.Tensor:
    """Inverse of :func:`normalize_latent`: ``feats * std + mean``, the latent the VAE decodes."""
    mean, std = _mean_std(stats, feats)
    return feats * std + mean


# -- the dataset ------------------------------------------------------------------------------------------------------

class LatentDataset(torch.utils.data.Dataset):
    """The latents of ``latent_root`` in one split (``"train"``, ``"val"`` or ``"all"``), in manifest order.

    ``ds[i]`` is a dict: ``name``; ``coords`` int64 [N, 3] active voxels at ``resolution``; ``feats`` float32
    [N, C], the raw posterior mean (normalise with :attr:`stats`); ``logvar`` float32 [N, C] when the folder stores
    it; with ``with_images`` the prepared item's conditioning renders ``images`` uint8 [V, S, S, 4] (RGBA).
    ``prepared_root`` overrides the prepared folder recorded in config.json (e.g. after moving it).
    """

    def __init__(self, latent_root: str | os.PathLike, split: str = "train", with_images: bool = True,
                 prepared_root: str | os.PathLike | None = None):
        self.root = Path(latent_root)
        self.config = read_latent_config(self.root)
        self.records = _records(self.root, split)
        self.prepared = Path(prepared_root if prepared_root is not None else self.config["prepared"])
        self.resolution = int(self.config["resolution"])
        self.with_images = with_images

    @property
    def stats(self) -> dict:
        """The normalisation statistics (stats.json of the folder)."""
        return read_stats(self.root)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        path = manifest.item_path(self.root, record)
        latent = load_latent(path)
        item = {"name": record["name"], "coords": latent.coords.long(), "feats": latent.feats.float(),
                "resolution": latent.resolution}
        if self.config.get("logvar"):
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device="cpu") as f:
                item["logvar"] = f.get_tensor("logvar").float()
        if self.with_images:
            item["images"] = self._images(record)
        return item

    def _images(self, record: dict) -> torch.Tensor:
        """Only the ``images`` array of the prepared item (a ``.npz`` reads its members lazily)."""
        path = manifest.item_path(self.prepared, {"name": record["name"], "file": record.get("prepared")},
                                  self.root / manifest.MANIFEST)
        if not path.is_file():
            raise InputError(f"{path}: prepared item of {record['name']!r} not found (moved? pass prepared_root)")
        with _open_item(path) as z:
            if "images" not in z.files:
                raise InputError(f"{path}: no conditioning images (prepared with --views 0)")
            return torch.from_numpy(z["images"])


def collate(items: list[dict]) -> dict:
    """One batch of :class:`LatentDataset` items: ``coords`` int64 [sumN, 4] with the item index first and
    ``feats`` float32 [sumN, C] (``SparseTensor(coords, feats)``), ``logvar`` likewise when stored, ``names``,
    ``resolution``, and with images ``images`` (list of uint8 [V, S, S, 4])."""
    if not items:
        raise InputError("cannot collate an empty list of items")
    resolution = items[0]["resolution"]
    if any(it["resolution"] != resolution for it in items):
        raise InputError("latents at different resolutions cannot share a batch")
    batch = {"coords": torch.cat([torch.cat([it["coords"].new_full((len(it["coords"]), 1), i), it["coords"]], dim=1)
                                  for i, it in enumerate(items)]),
             "feats": torch.cat([it["feats"] for it in items]),
             "names": [it["name"] for it in items], "resolution": resolution}
    if "logvar" in items[0]:
        batch["logvar"] = torch.cat([it["logvar"] for it in items])
    if "images" in items[0]:
        batch["images"] = [it["images"] for it in items]
    return batch

"""The manifest of a prepared dataset: per-shard record logs, merging, the train/val split, summary statistics.

Layout of a prepared directory::

    OUT_DIR/config.json            settings every shard must share
    OUT_DIR/items/<name>.npz       one file per prepared item
    OUT_DIR/parts/<shard>.jsonl    append-only log of the records one shard wrote (one JSON object per line)
    OUT_DIR/manifest.jsonl         every prepared item (merged from all parts), with its statistics and split
    OUT_DIR/failures.json          every item that could not be prepared, with the reason

Shards (``--shard I/N``, possibly on other machines sharing the directory) only ever append to their own part, so
they never contend for a file. :func:`merge` reads every part it finds and rewrites ``manifest.jsonl`` and
``failures.json`` atomically; ``data prepare`` calls it when it ends and ``data stats`` calls it again, so after the
last shard finishes (or a later ``data stats``) the manifest holds the union of all shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import InputError
from ..io import write_atomic

MANIFEST = "manifest.jsonl"
FAILURES = "failures.json"
PARTS = "parts"
ITEMS = "items"


def stable_unit(text: str) -> float:
    """A number in [0, 1) fixed by ``text`` alone (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0 ** 64


def part_path(root: Path, shard: int, num_shards: int) -> Path:
    return Path(root) / PARTS / f"shard-{shard:05d}-of-{num_shards:05d}.jsonl"


def append_record(part: Path, record: dict) -> None:
    """Append one record as a line and flush it to disk (a line cut by a crash is ignored when read)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "a", encoding="utf-8") as out:
        out.write(json.dumps(record, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())


def item_path(root: Path, record: dict, where: str | os.PathLike | None = None) -> Path:
    """``root / record["file"]``, after checking that the file named stays inside ``root``: a relative path
    without ``..`` (a manifest is data, and must not make us read or test files elsewhere). Raises
    :class:`~sparseflex.errors.InputError` naming ``where`` (default ``root/manifest.jsonl``) otherwise."""
    file = record.get("file")
    where = where if where is not None else Path(root) / MANIFEST
    if not isinstance(file, str) or not file.strip():
        raise InputError(f"{where}: item {record.get('name')!r} names no file")
    posix, windows = PurePosixPath(file), PureWindowsPath(file)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise InputError(f"{where}: item {record.get('name')!r} points outside the folder ({file!r}); only paths "
                         f"inside {root} are allowed")
    return Path(root) / posix


def _check_record(rec, root: Path, where: str) -> dict:
    """A record as read from a part or the manifest: a JSON object with a name and a status, and for a prepared
    item a file inside ``root``."""
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or "status" not in rec:
        raise InputError(f"{where}: not a record of `sparseflex data prepare` (a JSON object with name and status)")
    if rec["status"] == "ok":
        item_path(root, rec, where)
    return rec


def read_records(root: Path) -> dict[str, dict]:
    """The latest record of every item over all parts (a later line overrides an earlier one of the same part;
    across parts, a success beats a failure). A record naming a file outside ``root`` raises
    :class:`~sparseflex.errors.InputError`."""
    records: dict[str, dict] = {}
    for part in sorted((Path(root) / PARTS).glob("*.jsonl")):
        for number, line in enumerate(part.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn last line of an interrupted run
            _check_record(rec, root, f"{part}, line {number}")
            old = records.get(rec["name"])
            if old is None or old.get("part") == part.name or rec["status"] == "ok":
                records[rec["name"]] = {**rec, "part": part.name}
    for rec in records.values():
        rec.pop("part")
    return records


def assign_split(names: list[str], val_fraction: float, seed: int = 0) -> dict[str, str]:
    """``"train"`` or ``"val"`` per name, by a stable hash of the name: the same item lands in the same split
    whatever else is in the dataset. With two or more items at least one is ``val`` and one ``train``."""
    u = {n: stable_unit(f"split:{seed}:{n}") for n in names}
    split = {n: "val" if u[n] < val_fraction else "train" for n in names}
    if len(names) >= 2 and val_fraction > 0:
        if "val" not in split.values():
            split[min(names, key=u.get)] = "val"
        if "train" not in split.values():
            split[max(names, key=u.get)] = "train"
    return split


def merge(root: Path, val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Rewrite ``manifest.jsonl`` (prepared items, sorted by name, with their split) and ``failures.json`` from
    every part in ``root``; return both lists."""
    root = Path(root)
    records = read_records(root)
    ok = sorted((r for r in records.values() if r["status"] == "ok"), key=lambda r: r["name"])
    failed = sorted((r for r in records.values() if r["status"] != "ok"), key=lambda r: r["name"])
    split = assign_split([r["name"] for r in ok], val_fraction, seed)
    for r in ok:
        r["split"] = split[r["name"]]
    write_manifest(root, ok, failed)
    return ok, failed


def write_manifest(root: Path, ok: list[dict], failed: list[dict]) -> None:
    """Replace ``manifest.jsonl`` (the records ``ok``, one per line) and ``failures.json`` atomically."""
    write_atomic(Path(root) / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in ok).encode())
    write_atomic(Path(root) / FAILURES, (json.dumps(failed, indent=1, sort_keys=True) + "\n").encode())


def read_manifest(root: Path) -> list[dict]:
    """The records of ``manifest.jsonl``; a line that is not a record, or one naming a file outside ``root``,
    raises :class:`~sparseflex.errors.InputError`."""
    path = Path(root) / MANIFEST
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}, line {number}: not valid JSON") from None
        records.append(_check_record(rec, root, f"{path}, line {number}"))
    return records


def summarize(ok: list[dict], failed: list[dict]) -> list[tuple[str, str]]:
    """Rows ``(statistic, value)`` describing a prepared dataset."""
    def stat(values):
        if not values:
            return "-"
        return f"mean {statistics.fmean(values):,.0f}  median {statistics.median(values):,.0f}  " \
               f"min {min(values):,}  max {max(values):,}"

    val = sum(r["split"] == "val" for r in ok)
    rows = [("items prepared", f"{len(ok):,}"),
            ("items failed", f"{len(failed):,}"),
            ("split", f"train {len(ok) - val:,}  val {val:,}"),
            ("triangles", stat([r["triangles"] for r in ok])),
            ("components", stat([r["components"] for r in ok])),
            ("watertight", f"{sum(r['watertight'] for r in ok):,} of {len(ok):,}"),
            ("boundary edges", stat([r["boundary_edges"] for r in ok]))]
    levels = sorted({int(k) for r in ok for k in r["voxels"]})
    rows += [(f"voxels at {lv}^3", stat([r["voxels"][str(lv)] for r in ok if str(lv) in r["voxels"]]))
             for lv in levels]
    rows += [("points per item", stat([r["points"] for r in ok])),
             ("bytes per item", stat([r["bytes"] for r in ok])),
             ("total bytes", f"{sum(r['bytes'] for r in ok):,}"),
             ("seconds per item", f"mean {statistics.fmean([r['seconds'] for r in ok]):.2f}" if ok else "-")]
    reasons: dict[str, int] = {}
    for r in failed:
        key = _reason_kind(r["reason"])
        reasons[key] = reasons.get(key, 0) + 1
    rows += [(f"failed: {k}", f"{v:,}") for k, v in sorted(reasons.items())]
    return rows


def _reason_kind(reason: str) -> str:
    """The reason without the file name that starts load errors (``path: problem``)."""
    head, _, tail = reason.partition(": ")
    return (tail or head).split(" (")[0][:60]

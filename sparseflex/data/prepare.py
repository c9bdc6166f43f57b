"""Dataset preparation: a folder of meshes -> one compact training item per mesh, in parallel, resumable, sharded.

Per mesh (:func:`prepare_item`): load and normalise into [-0.5, 0.5]^3; sample surface points with normals; the
active voxels at the latent resolution R (voxels the triangles touch, plus those of the points jittered by about
one finest voxel, SPEC section 4); the occupancy at 2R, 4R, ... (the voxels the surface passes through: the pruning
targets); shaded conditioning renders from random views with varied field of view, and their cameras. Every random
number comes from a generator seeded by the item's name, so an item is the same whichever shard or worker makes it.

:func:`prepare_dataset` runs that over a sorted file list (every N-th file from the I-th for ``shard=(I, N)``), in
worker processes with a timeout per item, skips what an earlier run finished, and records everything in the
manifest (:mod:`sparseflex.data.manifest`). A run locks its shard of the output folder (:func:`shard_lock`), so two
runs of one shard never do the same work twice; different shards of one folder run side by side.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import InputError, OptionError, check_range
from ..eval.topology import boundary_edges, num_components, undirected_edges
from ..render.camera import Camera, intrinsics, look_at
from ..render.maps import render
from . import manifest
from .item import child_masks, quantize_points, save_item
from .mesh import LOAD_FORMATS, Mesh, load_mesh, normalize
from .sampling import sample_surface
from .voxelize import active_voxels, voxelize
from .workers import run_tasks

CONFIG = "config.json"


@dataclass(frozen=True)
class PrepareConfig:
    """What goes into every item; all shards writing one directory must share it."""
    points: int = 65_536            # surface samples (the paper: 819,200)
    resolution: int = 64            # latent resolution R
    levels: int = 2                 # occupancy at 2R, 4R, ...
    views: int = 4                  # conditioning renders (0: none)
    image_size: int = 256
    fov: tuple = (30.0, 60.0)       # field of view range of the renders, degrees
    seed: int = 0
    val_fraction: float = 0.05      # share of items in the validation split (by a stable hash of the name)

    def __post_init__(self):
        object.__setattr__(self, "fov", tuple(float(f) for f in self.fov))
        check_range("--points", self.points, 1, 1 << 26)
        check_range("--resolution", self.resolution, 2, 4096)
        check_range("--levels", self.levels, 0, 4)
        check_range("--resolution x 2^levels", self.fine_resolution, 2, 16384)
        check_range("--views", self.views, 0, 64)
        check_range("--image-size", self.image_size, 16, 2048)
        check_range("--val-fraction", self.val_fraction, 0, 1, high_open=True)
        if not 0 < self.fov[0] <= self.fov[1] < 180:
            raise OptionError(f"field of view range must satisfy 0 < low <= high < 180; got {self.fov}")

    @property
    def occupancy_resolutions(self) -> list[int]:
        return [self.resolution << level for level in range(1, self.levels + 1)]

    @property
    def fine_resolution(self) -> int:
        return self.resolution << self.levels


# -- one item ---------------------------------------------------------------------------------------------------------

def item_seed(name: str, seed: int) -> int:
    """The random seed of an item: a function of its name only."""
    return int(manifest.stable_unit(f"item:{seed}:{name}") * 2 ** 62)


def conditioning_views(mesh: Mesh, n: int, generator: torch.Generator, fov=(30.0, 60.0), size: int = 256) -> Camera:
    """``n`` cameras in uniformly random directions, aimed at the origin, each with a field of view drawn from
    ``fov`` and placed just far enough (up to 15 % more) for the mesh's bounding sphere to fit in the image."""
    direction = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp(min=1e-12)
    angle = fov[0] + (fov[1] - fov[0]) * torch.rand(n, generator=generator, dtype=torch.float64)
    radius = float(mesh.vertices.double().norm(dim=1).max())
    dist = radius / torch.sin(torch.deg2rad(angle) / 2) * (1 + 0.15 * torch.rand(n, generator=generator,
                                                                                  dtype=torch.float64))
    K = torch.stack([intrinsics(float(a), size, size, torch.float64) for a in angle])
    E = look_at(direction * dist[:, None], torch.zeros(n, 3, dtype=torch.float64))
    return Camera(K.float(), E.float(), size, size, (dist - radius).clamp(min=1e-3).float(), (dist + radius).float())


#: Direction towards the light in camera space (OpenCV: x right, y down, z forward): above left of the viewer.
_LIGHT = torch.tensor([-0.4, -0.6, -1.0]) / math.sqrt(0.16 + 0.36 + 1.0)


def shaded_images(mesh: Mesh, camera: Camera) -> np.ndarray:
    """Lambert-shaded grey renders with coverage as alpha, uint8 ``[B, H, W, 4]``."""
    maps = render(mesh.vertices.float(), mesh.faces, camera, antialias_edges=False)
    shade = 0.25 + 0.75 * (maps["normal"] @ _LIGHT).clamp(min=0)
    mask = maps["mask"]
    rgb = (shade * mask)[..., None] * torch.tensor([0.85, 0.85, 0.88])
    rgba = torch.cat([rgb, mask[..., None]], dim=-1)
    return (rgba * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def mesh_statistics(mesh: Mesh) -> dict:
    """Triangles, vertices, connected components, boundary / non-manifold edges and watertightness."""
    _, uses = undirected_edges(mesh.faces)
    return {"triangles": mesh.num_faces, "vertices": mesh.num_vertices, "components": num_components(mesh.faces),
            "boundary_edges": int(len(boundary_edges(mesh.faces))), "nonmanifold_edges": int((uses > 2).sum()),
            "watertight": bool((uses == 2).all())}


def prepare_item(path: str | os.PathLike, config: PrepareConfig, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of one item (layout in :mod:`sparseflex.data.item`) and its statistics.

    Raises :class:`~sparseflex.errors.InputError` for a mesh that cannot be used.
    """
    normed, transform = normalize(load_mesh(path))
    gen = torch.Generator().manual_seed(seed)
    points, normals, _ = sample_surface(normed, config.points, generator=gen)
    # grouped by latent voxel: neighbours share face normals, which then compress 2.5 times better
    cell = torch.floor((points.double() + 0.5) * config.resolution).long().clamp_(0, config.resolution - 1)
    order = torch.argsort((cell[:, 0] * config.resolution + cell[:, 1]) * config.resolution + cell[:, 2], stable=True)
    points, normals = points[order], normals[order]
    coords = active_voxels(normed, points, config.resolution, config.resolution / config.fine_resolution)
    occupancy = [voxelize(normed, r) for r in config.occupancy_resolutions]
    arrays = {"points_q": quantize_points(points), "normals": normals.numpy().astype(np.float16),
              "coords": coords.numpy().astype(np.int16),
              **{f"children_{r}": child_masks(parent, child)
                 for r, parent, child in zip(config.occupancy_resolutions, [coords] + occupancy, occupancy)},
              "vertices": normed.vertices.numpy().astype(np.float32), "faces": normed.faces.numpy().astype(np.int32),
              "center": transform.center.double().numpy(), "scale": np.float64(transform.scale),
              "resolution": np.int64(config.resolution),
              "levels": np.asarray(config.occupancy_resolutions, dtype=np.int64)}
    if config.views:
        camera = conditioning_views(normed, config.views, gen, config.fov, config.image_size)
        arrays.update(images=shaded_images(normed, camera), K=camera.K.numpy(), extrinsics=camera.extrinsics.numpy(),
                      near=camera.near.numpy(), far=camera.far.numpy())
    voxels = {str(config.resolution): len(coords), **{str(r): len(o) for r, o in
                                                         zip(config.occupancy_resolutions, occupancy)}}
    return arrays, {**mesh_statistics(normed), "voxels": voxels, "points": config.points}


# -- the file list ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input mesh: its name (unique, derived from the relative path) and its path."""
    name: str
    path: Path


def check_input_dir(input_dir: str | os.PathLike) -> Path:
    """``input_dir`` as a Path, after checking it is a folder."""
    root = Path(input_dir)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    return root


def list_sources(input_dir: str | os.PathLike) -> list[Source]:
    """Every mesh file under ``input_dir`` (recursively), sorted by relative path. The name is the relative path
    with ``/`` replaced by ``__``."""
    root = check_input_dir(input_dir)
    paths = sorted((p for p in root.rglob("*") if p.suffix.lower() in LOAD_FORMATS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    sources = [Source(p.relative_to(root).as_posix().replace("/", "__"), p) for p in paths]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise InputError(f"{root}: two input files map to the item name {dup!r}; rename one")
    return sources


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise OptionError(f"--shard must look like I/N (e.g. 0/4); got {text!r}") from None
    if not 0 <= i < n:
        raise OptionError(f"--shard I/N needs 0 <= I < N; got {text!r}")
    return i, n


def select_shard(sources: list, shard: int, num_shards: int) -> list:
    """Items ``shard, shard + N, shard + 2N, ...`` of the sorted list: shards are disjoint and cover it."""
    return sources[shard::num_shards]


# -- the whole run ----------------------------------------------------------------------------------------------------

@dataclass
class PrepareResult:
    prepared: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list = field(default_factory=list)   # records of the failures of this run


def _init_worker() -> None:
    torch.set_num_threads(1)  # K workers on K cores: intra-op threads would only contend


def _prepare_task(task: tuple) -> dict:
    source, item_path, config, seed = task
    start = time.perf_counter()
    arrays, stats = prepare_item(source, PrepareConfig(**config), seed)
    size = save_item(item_path, arrays)
    return {**stats, "bytes": size, "seconds": round(time.perf_counter() - start, 3)}


def read_config(root: str | os.PathLike) -> PrepareConfig:
    """The settings a prepared directory was made with."""
    path = Path(root) / CONFIG
    if not path.exists():
        raise InputError(f"{root}: not a prepared dataset (no {CONFIG})")
    try:
        return PrepareConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError):  # another folder's config.json (a latent folder, ...) or a torn one
        raise InputError(f"{root}: not a prepared dataset (its {CONFIG} is not from `sparseflex data prepare`)"
                         ) from None


def check_config(root: Path, config: PrepareConfig) -> None:
    """Record the settings in ``root/config.json``, or check they equal those of an earlier run or shard."""
    path = root / CONFIG
    wanted = json.loads(json.dumps(asdict(config)))
    if path.exists():
        found = json.loads(path.read_text())
        if found != wanted:
            diff = ", ".join(f"{k}={found.get(k)!r}" for k in sorted(wanted) if found.get(k) != wanted[k])
            raise OptionError(f"{root} was prepared with other settings ({diff}); use another output directory "
                              f"or the same settings")
    else:
        manifest.write_atomic(path, (json.dumps(wanted, indent=1, sort_keys=True) + "\n").encode())


#: What a prepared directory may hold before its config.json is written (besides the locks).
_EARLY_ENTRIES = {manifest.PARTS, manifest.ITEMS}
LOCK_PREFIX = ".lock-"


def check_out_dir(root: str | os.PathLike, what: str = "a prepared dataset") -> Path:
    """Refuse an output folder that is a file, or a non-empty folder that is not ``what`` (a folder of ours, with
    its config.json: anything else would have its files mixed with ours, its manifest.jsonl replaced); return it as
    a Path."""
    root = Path(root)
    if os.path.lexists(root) and not root.is_dir():
        raise OptionError(f"{root} exists and is not a folder")
    if root.is_dir() and not (root / CONFIG).exists():  # not (yet) a prepared dataset: empty but for our start
        foreign = sorted(e.name for e in root.iterdir() if e.name not in _EARLY_ENTRIES and not e.name.startswith("."))
        if foreign:
            raise OptionError(f"{root} is not empty and not {what} (it holds {foreign[0]!r}); give a new or empty "
                              "output folder")
    return root


def in_use(root: Path) -> bool:
    """Whether a prepare run (of any shard) holds its lock in ``root``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux / macOS
        return False
    for lock in Path(root).glob(f"{LOCK_PREFIX}*"):
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


@contextmanager
def shard_lock(root: Path, shard: tuple[int, int], what: str = "prepare"):
    """Hold an exclusive lock on this shard of ``root`` (``root/.lock-shard-I-of-N``, ``fcntl.flock``, released
    when the process ends however it ends) for the whole run: a second run of the same shard into the same folder
    fails at once instead of doing all the work again. Different shards of one folder still run side by side, on
    one machine or several sharing it (flock works over NFS on Linux). Without ``fcntl`` (Windows) nothing is
    locked. ``what`` names the kind of run in the error."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux / macOS
        yield
        return
    path = root / f"{LOCK_PREFIX}{manifest.part_path(root, *shard).stem}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            which = f" of shard {shard[0]}/{shard[1]}" if shard[1] > 1 else ""
            raise OptionError(f"{root} is in use by another {what} run{which} (pid {pid})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare_dataset(input_dir, out_dir, config: PrepareConfig = PrepareConfig(), shard: tuple[int, int] = (0, 1),
                    workers: int = 1, timeout: float | None = 600.0, retry_failed: bool = False,
                    log: Callable[[str], None] = print) -> PrepareResult:
    """Prepare every mesh of ``input_dir`` (this shard's part) into ``out_dir``; see the module docstring.

    Items that an earlier run prepared (or failed on, unless ``retry_failed``) are skipped. Never raises for one
    bad mesh: it is recorded with its reason. Ends by merging the manifest of all shards found in ``out_dir``.
    A run holds a lock on its shard of ``out_dir`` (:func:`shard_lock`): a second run of the same shard into the
    same folder raises :class:`~sparseflex.errors.OptionError` while the first is running.
    """
    if timeout is not None:
        check_range("--timeout", timeout, 0, low_open=True)
    sources = select_shard(list_sources(input_dir), *shard)
    root = Path(out_dir)
    check_out_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    with shard_lock(root, shard):
        check_config(root, config)
        (root / manifest.ITEMS).mkdir(exist_ok=True)
        return _prepare(sources, Path(input_dir), root, config, shard, workers, timeout, retry_failed, log)


def remove_temporaries(items: Path, names: set[str], suffix: str = ".npz") -> None:
    """Delete the temporary files of the items ``names`` (``.NAME.XXXXXXXX.tmp<suffix>``, see
    :func:`sparseflex.io.atomic_path`) that a killed worker or run left in ``items``; this run holds the lock of
    their shard, so no one else is writing them."""
    if not names:
        return
    # the temporary name atomic_path gives an item file (mkstemp adds 8 random characters)
    temporary = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp" + re.escape(suffix))
    for entry in os.scandir(items):
        m = temporary.fullmatch(entry.name)
        if m and m.group(1) in names:
            Path(entry.path).unlink(missing_ok=True)


def _prepare(sources, input_dir: Path, root: Path, config: PrepareConfig, shard, workers, timeout, retry_failed,
             log) -> PrepareResult:
    part = manifest.part_path(root, *shard)
    earlier = manifest.read_records(root)

    def finished(s: Source) -> bool:
        rec = earlier.get(s.name)
        if rec is None:
            return False
        if rec["status"] == "ok":
            return manifest.item_path(root, rec).exists()
        return not retry_failed

    todo = [s for s in sources if not finished(s)]
    remove_temporaries(root / manifest.ITEMS, {s.name for s in todo})
    result = PrepareResult(skipped=len(sources) - len(todo))
    if result.skipped:
        log(f"skipping {result.skipped} of {len(sources)} items finished by an earlier run")
    tasks = [(str(s.path), str(root / manifest.ITEMS / f"{s.name}.npz"), asdict(config), item_seed(s.name, config.seed))
             for s in todo]
    try:
        for done, res in enumerate(run_tasks(_prepare_task, tasks, workers, timeout, _init_worker), 1):
            s = todo[res.index]
            record = {"name": s.name, "source": s.path.relative_to(input_dir).as_posix()}
            if res.ok:
                record.update(status="ok", file=f"{manifest.ITEMS}/{s.name}.npz", **res.value)
                result.prepared += 1
                log(f"[{done}/{len(todo)}] {s.name}: {record['triangles']:,} triangles, {record['bytes']:,} bytes, "
                    f"{record['seconds']:.1f} s")
            else:
                record.update(status="failed", reason=res.value)
                remove_temporaries(root / manifest.ITEMS, {s.name})  # left by a killed worker
                Path(tasks[res.index][1]).unlink(missing_ok=True)  # written by a task that finished too late
                result.failed += 1
                result.failures.append(record)
                log(f"[{done}/{len(todo)}] {s.name}: FAILED: {res.value}")
            manifest.append_record(part, record)
    finally:
        ok, failed = manifest.merge(root, config.val_fraction, config.seed)
    log(f"prepared {result.prepared}, skipped {result.skipped} (already finished), failed {result.failed}; "
        f"manifest: {len(ok)} items, {len(failed)} failures in total ({root / manifest.FAILURES})")
    return result

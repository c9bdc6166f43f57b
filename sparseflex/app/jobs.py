"""The web app's jobs, run one at a time in a worker process that calls the library's pipelines.

The page never runs a pipeline in the server process: each job goes to one long-lived worker process (spawned, so it
shares nothing with the server's threads) that loads the mesh, calls :func:`~sparseflex.fit.convert.mesh_to_sparseflex`,
the :class:`~sparseflex.fit.fitter.Fitter`, :func:`~sparseflex.pipelines.reconstruct.reconstruct` or the
:class:`~sparseflex.pipelines.generate.ImageTo3DPipeline`, writes the meshes and pictures into the job's folder and
sends back progress and a small result (paths and numbers). Stopping a job kills the worker, which gives every byte it
held back to the system, and a fresh worker starts for the next job. A user mistake in a job (a corrupt mesh, a
checkpoint of the wrong kind) comes back as the library's one-line message; the worker keeps serving.

This module imports neither gradio nor torch at import time: the worker process imports only what its jobs need.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

#: Mesh files the app reads (the library's :data:`~sparseflex.data.mesh.LOAD_FORMATS`, spelled out so that building
#: the page imports no torch).
MESH_TYPES = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
#: What every mesh job writes, in this order (the first is what the 3D viewer shows).
MESH_OUTPUTS = (".glb", ".ply", ".obj")
#: Metrics shown in the page: key of :func:`~sparseflex.eval.metrics.mesh_metrics` -> label.
METRIC_ROWS = {"chamfer": "Chamfer distance (x 10^4)", "chamfer_l1": "Chamfer L1 (x 10^4)",
               "fscore@0.001": "F-score @ 0.001 (%)", "fscore@0.01": "F-score @ 0.01 (%)",
               "normal_consistency": "normal consistency"}


class JobError(Exception):
    """A job that could not finish: one line for the page."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- the jobs (run in the worker process) -----------------------------------------------------------------------------

Progress = Callable[[float, str], None]


def _load_mesh(path: str, name: str):
    """The uploaded mesh, its messages naming the file as the user called it (not the server's upload path)."""
    from ..data.mesh import load_mesh
    from ..errors import SparseFlexError
    try:
        return load_mesh(path)
    except SparseFlexError as exc:
        raise type(exc)(str(exc).replace(str(path), name)) from None


def _write_meshes(folder: Path, stem: str, mesh) -> dict[str, str]:
    from ..data.mesh import save_mesh
    return {ext: str(save_mesh(folder / f"{stem}{ext}", mesh)) for ext in MESH_OUTPUTS}


def _mesh_result(folder: Path, name: str, label: str, mesh, normed, result, result_normed, info: dict,
                 params: dict, progress: Progress) -> dict:
    """Write the result (GLB, PLY, OBJ), its metrics against the input and the normal renders (outside and interior
    views of the input and the result); the small dict the page shows."""
    from ..eval.metrics import mesh_metrics
    from ..fit.report import comparison_image

    stem = f"{Path(name).stem or 'mesh'}_{label}"
    progress(0.9, "writing the meshes")
    files = _write_meshes(folder, stem, result)
    info = {**info, "vertices": len(result.vertices), "faces": len(result.faces)}
    metrics = None
    if params.get("metrics_points"):
        progress(0.92, "metrics against the input")
        metrics = mesh_metrics(result, mesh, num_points=int(params["metrics_points"]), seed=int(params.get("seed", 0)))
    progress(0.96, "normal renders")
    views = comparison_image(normed.to("cpu"), {label: result_normed.to("cpu")}, folder / f"{stem}_views.png")
    return {"mesh": files[".glb"], "files": list(files.values()), "views": str(views), "metrics": metrics,
            "info": info}


def _input_preview(folder: Path, mesh) -> str:
    """The input as GLB, for the viewer beside the result (the viewer reads neither OFF nor every PLY)."""
    from ..data.mesh import save_mesh
    return str(save_mesh(folder / "input.glb", mesh))


def convert_job(params: dict, folder: Path, progress: Progress, cache: dict, device: str) -> dict:
    from ..data.mesh import Mesh, normalize
    from ..fit.convert import mesh_to_sparseflex

    start = time.perf_counter()
    progress(0.0, "reading the mesh")
    mesh = _load_mesh(params["mesh"], params["name"])
    preview = _input_preview(folder, mesh)
    normed, transform = normalize(mesh)
    progress(0.1, f"converting at {params['resolution']}^3")
    sf = mesh_to_sparseflex(normed, int(params["resolution"]), dilation=int(params.get("dilation", 1)),
                            seed=int(params.get("seed", 0)), thin_sheets=bool(params.get("thin_sheets", True)))
    progress(0.8, "extracting the surface")
    ex = sf.extract()
    result_normed = Mesh(ex.vertices.detach(), ex.faces)
    result = Mesh(transform.invert(result_normed.vertices), ex.faces)
    info = {"resolution": sf.resolution, "voxels": sf.num_voxels}
    out = _mesh_result(folder, params["name"], "convert", mesh, normed, result, result_normed, info, params, progress)
    out["input"] = preview
    out["info"]["seconds"] = round(time.perf_counter() - start, 2)
    return out


def fit_job(params: dict, folder: Path, progress: Progress, cache: dict, device: str) -> dict:
    import torch

    from ..data.mesh import Mesh, normalize
    from ..fit.fitter import FitConfig, Fitter

    start = time.perf_counter()
    config = FitConfig(resolution=int(params["resolution"]), iterations=int(params["iterations"]),
                       seed=int(params.get("seed", 0)), checkpoint_every=0).validate()
    progress(0.0, "reading the mesh")
    mesh = _load_mesh(params["mesh"], params["name"])
    preview = _input_preview(folder, mesh)
    normed, transform = normalize(mesh)
    progress(0.02, f"starting from convert at {config.resolution}^3")
    fitter = Fitter(normed.to(device), config)
    total = max(config.iterations, 1)

    def step(state, loss):
        progress(0.05 + 0.8 * state.step / total,
                 f"step {state.step}/{config.iterations}, {state.sf.num_voxels} voxels, loss {loss:.4f}")

    sf = fitter.run(progress=step)
    progress(0.86, "extracting the surface")
    with torch.no_grad():
        ex = sf.extract()
    result_normed = Mesh(ex.vertices.detach().cpu(), ex.faces.cpu())
    result = Mesh(transform.invert(result_normed.vertices), result_normed.faces)
    info = {"resolution": sf.resolution, "iterations": config.iterations, "voxels": sf.num_voxels}
    out = _mesh_result(folder, params["name"], "fit", mesh, normed, result, result_normed, info, params, progress)
    out["input"] = preview
    out["info"]["seconds"] = round(time.perf_counter() - start, 2)
    return out


def _cached(cache: dict, key, load):
    """One model at a time stays loaded in the worker (a second would double its memory)."""
    if key not in cache:
        cache.clear()
        gc.collect()
        cache[key] = load()
    return cache[key]


def reconstruct_job(params: dict, folder: Path, progress: Progress, cache: dict, device: str) -> dict:
    from ..data.mesh import Mesh, normalize
    from ..models import load_model
    from ..pipelines.reconstruct import reconstruct

    start = time.perf_counter()
    progress(0.0, "reading the mesh")
    mesh = _load_mesh(params["mesh"], params["name"])
    preview = _input_preview(folder, mesh)
    progress(0.05, "loading the VAE")
    model = _cached(cache, ("vae", params["checkpoint"], device),
                    lambda: load_model(params["checkpoint"], device=device))
    progress(0.2, "encoding and decoding")
    rec = reconstruct(model, mesh, seed=int(params.get("seed", 0)), chunk_size=64, metrics=False)
    normed, transform = normalize(mesh)
    result = Mesh(rec.mesh.vertices.detach().cpu(), rec.mesh.faces.cpu())
    result_normed = Mesh(transform.apply(result.vertices), result.faces)
    info = {"resolution": rec.sparseflex.resolution, "voxels": rec.sparseflex.num_voxels}
    out = _mesh_result(folder, params["name"], "vae", mesh, normed, result, result_normed, info, params, progress)
    out["input"] = preview
    out["info"]["seconds"] = round(time.perf_counter() - start, 2)
    return out


def generate_job(params: dict, folder: Path, progress: Progress, cache: dict, device: str) -> dict:
    from ..data.images import preprocess_image
    from ..data.mesh import Mesh
    from ..errors import SparseFlexError
    from ..pipelines.generate import ImageTo3DPipeline
    from ..render.images import input_and_views

    start = time.perf_counter()
    image, name = params["image"], params["name"]
    progress(0.0, "reading the image")
    try:
        picture = preprocess_image(image)
    except SparseFlexError as exc:
        raise type(exc)(str(exc).replace(str(image), name)) from None
    progress(0.02, "loading the pipeline")
    pipe = _cached(cache, ("pipeline", params["pipeline"], device),
                   lambda: ImageTo3DPipeline.from_file(params["pipeline"], device))
    steps = int(params["steps"])
    done = {"structure": 0, "latent": 0}

    def step(stage, i, n):
        done[stage] = i
        progress(0.05 + 0.8 * (done["structure"] + done["latent"]) / (2 * steps), f"{stage} flow: step {i}/{n}")

    result = pipe([image], seed=int(params.get("seed", 0)), structure_steps=steps, slat_steps=steps,
                  structure_guidance=float(params["guidance"]), slat_guidance=float(params["guidance"]),
                  progress=step)[0]
    progress(0.9, "writing the mesh")
    mesh = Mesh(result.mesh.vertices.detach().cpu(), result.mesh.faces.cpu())
    files = _write_meshes(folder, Path(name).stem or "image", mesh)
    views = input_and_views(picture, {"generated": mesh}, folder / "views.png")
    info = {"resolution": pipe.resolution, "structure voxels": len(result.structure),
            "voxels": result.sparseflex.num_voxels, "vertices": len(mesh.vertices), "faces": len(mesh.faces),
            **{f"{k} s": round(v, 2) for k, v in result.seconds.items()},
            "seconds": round(time.perf_counter() - start, 2)}
    return {"mesh": files[".glb"], "files": list(files.values()), "views": str(views), "metrics": None, "info": info}


JOBS = {"convert": convert_job, "fit": fit_job, "reconstruct": reconstruct_job, "generate": generate_job}


def _worker_main(conn, device: str) -> None:
    """The worker process: run the jobs it receives, one at a time, until the pipe closes."""
    import torch  # noqa: F401  (imported once, before the first job, so that jobs start warm)

    from ..data import mesh  # noqa: F401
    from ..errors import SparseFlexError
    from ..eval import metrics  # noqa: F401
    from ..fit import convert, fitter, report  # noqa: F401
    cache: dict = {}
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        kind, params, folder = message
        last = [0.0]

        def progress(fraction: float, text: str) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.1:  # at most ten messages a second
                last[0] = now
                conn.send(("progress", float(fraction), text))

        try:
            result = JOBS[kind](params, Path(folder), progress, cache, device)
            conn.send(("done", result))
        except SparseFlexError as exc:
            conn.send(("error", one_line(exc)))
        except MemoryError:
            conn.send(("error", "out of memory: try a lower resolution"))
        except OSError as exc:
            conn.send(("error", one_line(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")))
        except Exception as exc:  # a bug: the page gets one line, the server's log the whole story
            traceback.print_exc(file=sys.stderr)
            conn.send(("error", one_line(f"internal error ({type(exc).__name__}: {exc})")))
        finally:
            gc.collect()


# -- the server's side ------------------------------------------------------------------------------------------------

class Worker:
    """The one worker process of an app. :meth:`run` sends it a job and yields its messages; a job that is left
    before it finishes (the user pressed Stop, the page went away) kills the process, freeing its memory, and a
    fresh one is started for the next job."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self._busy = None  # the token of the job running now

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def start(self) -> None:
        """Start the process (it then imports torch and the library in the background) unless it runs."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.device), name="sparseflex-app-worker",
                                 daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent

    def stop(self, restart: bool = False) -> None:
        """Kill the process (whatever it is doing) and wait for it; with ``restart``, start a fresh one."""
        with self._lock:
            self._stop_locked()
            if restart:
                self._start_locked()

    def _stop_locked(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self._busy = None
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=30)
            proc.close()
        if conn is not None:
            conn.close()

    def run(self, kind: str, params: dict, folder: str | os.PathLike, poll: float = 0.25) -> Iterator[tuple]:
        """Run one job; yields ``("progress", fraction, text)``, ``("wait",)`` every ``poll`` seconds while nothing
        happens (so that the caller can be stopped), and last ``("done", result)``; a failed job raises
        :class:`JobError` with its one-line message."""
        token = object()
        with self._lock:
            if self._busy is not None:  # a job that was left without being closed: it is stopped now
                self._stop_locked()
            self._start_locked()
            self._busy = token
            conn, proc = self._conn, self._proc
            conn.send((kind, params, str(folder)))
        finished = False
        try:
            while True:
                if self._busy is not token:
                    raise JobError("the job was stopped")
                try:
                    ready = conn.poll(poll)
                    message = conn.recv() if ready else None
                except (EOFError, OSError):
                    message = ("lost",)
                if message is None:
                    if not proc.is_alive():
                        message = ("lost",)
                    else:
                        yield ("wait",)
                        continue
                if message[0] == "progress":
                    yield message
                elif message[0] == "ready":
                    continue
                elif message[0] == "done":
                    finished = True
                    yield message
                    return
                elif message[0] == "error":
                    finished = True
                    raise JobError(message[1])
                else:
                    code = proc.exitcode
                    raise JobError("the job stopped unexpectedly" + (
                        " (killed: out of memory?)" if code is not None and code < 0 else
                        f" (exit status {code})" if code is not None else ""))
        finally:
            with self._lock:
                if self._busy is token:
                    self._busy = None
                    if not finished:  # stopped, left or lost: free its memory, warm up the next worker
                        self._stop_locked()
                        self._start_locked()


# -- per-session folders ----------------------------------------------------------------------------------------------

class SessionFolders:
    """Every file of a session (uploads excepted, which gradio keeps) under one temporary folder: one folder per
    job, the older ones of the session removed when a new one starts, the session's folder when it ends, and the
    whole root when the app stops."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._count = 0
        self._lock = threading.Lock()

    def _session(self, session: str | None) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", session or "anonymous")[:64] or "anonymous"
        return self.root / "sessions" / safe

    def new_job(self, session: str | None, kind: str) -> Path:
        import shutil
        folder = self._session(session)
        with self._lock:
            self._count += 1
            job = folder / f"{self._count:05d}-{kind}"
        if folder.is_dir():
            for old in folder.iterdir():
                if old.name.endswith(f"-{kind}"):  # each tab shows only its latest result
                    shutil.rmtree(old, ignore_errors=True)
        job.mkdir(parents=True)
        return job

    def end_session(self, session: str | None) -> None:
        import shutil
        shutil.rmtree(self._session(session), ignore_errors=True)

    def remove_all(self) -> None:
        import shutil
        shutil.rmtree(self.root, ignore_errors=True)

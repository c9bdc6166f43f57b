"""The Gradio page of ``sparseflex app``: tabs Convert / Fit, Reconstruct (VAE) and Generate (image to 3D).

Every button queues a job (one runs at a time; the others show their place in the queue) that the
:class:`~sparseflex.app.jobs.Worker` runs with the library's pipelines. A job's messages update the progress bar; its
result fills the 3D viewer (GLB) beside the input, the metrics table, the normal renders and the downloads. Stop
ends the running job and frees its memory. A bad upload or option is a message in the page (the library's one line),
never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from .jobs import MESH_TYPES, METRIC_ROWS, JobError, SessionFolders, Worker

RESOLUTIONS = [32, 64, 128, 256, 512, 1024]
#: Files that may be uploaded, by default (``--max-upload-mb``).
DEFAULT_MAX_UPLOAD_MB = 200
#: Every job shares this queue slot: one job at a time over all tabs.
QUEUE = "sparseflex-job"
#: The 3D viewers: seen from above and aside (degrees around and from the vertical axis), on a light grey.
VIEWER = dict(height=400, clear_color=(0.93, 0.93, 0.93, 1.0), camera_position=(-55, 65, None), interactive=False)

_skip = getattr(gr, "skip", gr.update)  # "leave this output as it is" (gr.skip since gradio 5)

INTRO = """# SparseFlex
Sparse-voxel FlexiCubes meshes of any topology (open surfaces, interiors) at high resolution.
Upload a mesh, pick a resolution, and **Convert** (no optimisation, seconds) or **Fit** (rendering losses, minutes).
Jobs run one at a time; your place in the queue shows on the result."""


class SparseFlexApp:
    """The page and what it needs: the worker process and the per-session folders."""

    def __init__(self, root: str | os.PathLike, checkpoint: str | None = None, pipeline: str | None = None,
                 device: str = "cpu", max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB):
        self.checkpoint, self.pipeline, self.device = checkpoint, pipeline, device
        self.max_upload_mb = max_upload_mb
        self.sessions = SessionFolders(root)
        self.worker = Worker(device)

    # -- helpers ------------------------------------------------------------------------------------------------------
    def _upload(self, path, what: str) -> tuple[str, str]:
        """The uploaded file's path and the name the user gave it, after the checks that need no reading."""
        if path is None:
            raise _error(f"upload {what} first")
        path = getattr(path, "name", path)  # gradio 3-style file objects
        name = Path(path).name
        if not os.path.isfile(path):
            raise _error(f"{name}: the upload did not arrive; upload it again")
        size = os.path.getsize(path)
        if size > self.max_upload_mb * 2 ** 20:
            raise _error(f"{name}: {size / 2 ** 20:.1f} MB is over this app's upload limit of {self.max_upload_mb} MB")
        if size == 0:
            raise _error(f"{name}: file is empty")
        return str(path), name

    def _run(self, kind: str, params: dict, request, progress, outputs: int):
        """Run a job in the worker, moving the progress bar; the last value is the job's result."""
        session = getattr(request, "session_hash", None)
        folder = self.sessions.new_job(session, kind)
        nothing = tuple(_skip() for _ in range(outputs))
        progress(0.0, desc="starting")
        try:
            for message in self.worker.run(kind, params, folder):
                if message[0] == "progress":
                    progress(message[1], desc=message[2])
                elif message[0] == "done":
                    return message[1]
                yield nothing
        except JobError as exc:
            raise _error(str(exc)) from None

    @staticmethod
    def _metrics_table(metrics: dict | None) -> list[list[str]]:
        if not metrics:
            return []
        ceiling = metrics.get("ceiling") or {}

        def fmt(v):  # a perfect prediction's distances are round-off (1e-30): show them as 0
            return "-" if v is None else f"{0.0 if abs(v) < 1e-12 else v:.6g}"
        return [[label, fmt(metrics.get(key)), fmt(ceiling.get(key))] for key, label in METRIC_ROWS.items()]

    @staticmethod
    def _summary(kind: str, result: dict) -> str:
        info = result["info"]
        parts = [f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in info.items()
                 if k not in ("resolution", "seconds")]
        return (f"**{kind}** at {info['resolution']}^3: {', '.join(parts)}; {info['seconds']} s. "
                f"Downloads: GLB, PLY, OBJ (the input's coordinates).")

    def _mesh_job(self, kind: str, params: dict, request, progress):
        result = yield from self._run(kind, params, request, progress, 6)
        yield (result["input"], result["mesh"], self._metrics_table(result["metrics"]), result["views"],
               result["files"], self._summary(kind, result))

    # -- the handlers (their names are the API's) ---------------------------------------------------------------------
    def convert(self, mesh, resolution, seed, metrics_points, thin_sheets, request: gr.Request,
                progress=gr.Progress()):
        path, name = self._upload(mesh, "a mesh")
        params = {"mesh": path, "name": name, "resolution": _choice(resolution, RESOLUTIONS, "resolution"),
                  "seed": _int(seed, "seed", 0, 2 ** 32 - 1),
                  "metrics_points": _int(metrics_points, "metric samples", 0, 10_000_000),
                  "thin_sheets": bool(thin_sheets)}
        yield from self._mesh_job("convert", params, request, progress)

    def fit(self, mesh, resolution, iterations, seed, metrics_points, request: gr.Request, progress=gr.Progress()):
        path, name = self._upload(mesh, "a mesh")
        params = {"mesh": path, "name": name, "resolution": _choice(resolution, RESOLUTIONS, "resolution"),
                  "iterations": _int(iterations, "iterations", 0, 100_000), "seed": _int(seed, "seed", 0, 2 ** 32 - 1),
                  "metrics_points": _int(metrics_points, "metric samples", 0, 10_000_000)}
        yield from self._mesh_job("fit", params, request, progress)

    def reconstruct(self, mesh, seed, metrics_points, request: gr.Request, progress=gr.Progress()):
        if not self.checkpoint:
            raise _error(NEEDS_CHECKPOINT)
        path, name = self._upload(mesh, "a mesh")
        params = {"mesh": path, "name": name, "checkpoint": self.checkpoint, "seed": _int(seed, "seed", 0, 2 ** 32 - 1),
                  "metrics_points": _int(metrics_points, "metric samples", 0, 10_000_000)}
        yield from self._mesh_job("reconstruct", params, request, progress)

    def generate(self, image, seed, steps, guidance, request: gr.Request, progress=gr.Progress()):
        if not self.pipeline:
            raise _error(NEEDS_PIPELINE)
        path, name = self._upload(image, "an image")
        params = {"image": path, "name": name, "pipeline": self.pipeline, "seed": _int(seed, "seed", 0, 2 ** 32 - 1),
                  "steps": _int(steps, "steps", 1, 1000), "guidance": _float(guidance, "guidance", 0, 100)}
        result = yield from self._run("generate", params, request, progress, 4)
        yield result["mesh"], result["views"], result["files"], self._summary("generate", result)

    def end_session(self, request: gr.Request):
        self.sessions.end_session(getattr(request, "session_hash", None))

    def close(self) -> None:
        """Stop the worker and remove every file the app made."""
        self.worker.stop()
        self.sessions.remove_all()

    # -- the page -----------------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(title="SparseFlex", analytics_enabled=False, delete_cache=(3600, 6 * 3600)) as demo:
            gr.Markdown(INTRO)
            with gr.Tab("Convert / Fit"):
                with gr.Row():
                    mesh = gr.File(label="mesh (OBJ, PLY, STL, OFF, GLB)", file_types=list(MESH_TYPES),
                                   type="filepath")
                    with gr.Column():
                        resolution = gr.Dropdown(RESOLUTIONS, value=128, label="resolution (voxels per side)")
                        iterations = gr.Slider(0, 5000, value=150, step=10, label="fit iterations")
                        with gr.Accordion("options", open=False):
                            seed, points = _seed_and_points()
                            thin = gr.Checkbox(True, label="keep sheets thinner than a voxel (convert)")
                with gr.Row():
                    convert_btn = gr.Button("Convert", variant="primary")
                    fit_btn = gr.Button("Fit", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
                outs, viewers = _mesh_outputs()
                ev1 = _job_event(convert_btn, self.convert, [mesh, resolution, seed, points, thin], outs, viewers,
                                 "convert")
                ev2 = _job_event(fit_btn, self.fit, [mesh, resolution, iterations, seed, points], outs, viewers, "fit")
                stop.click(None, None, None, cancels=[ev1, ev2], api_name=False)
            with gr.Tab("Reconstruct (VAE)"):
                gr.Markdown(f"Encode an uploaded mesh with the VAE `{Path(self.checkpoint).name}` and decode it."
                            if self.checkpoint else NEEDS_CHECKPOINT)
                with gr.Row():
                    vmesh = gr.File(label="mesh (OBJ, PLY, STL, OFF, GLB)", file_types=list(MESH_TYPES),
                                    type="filepath")
                    with gr.Column():
                        vseed, vpoints = _seed_and_points()
                with gr.Row():
                    vbtn = gr.Button("Reconstruct", variant="primary", interactive=bool(self.checkpoint))
                    vstop = gr.Button("Stop", variant="stop")
                vouts, vviewers = _mesh_outputs()
                ev3 = _job_event(vbtn, self.reconstruct, [vmesh, vseed, vpoints], vouts, vviewers, "reconstruct")
                vstop.click(None, None, None, cancels=[ev3], api_name=False)
            with gr.Tab("Generate (image to 3D)"):
                gr.Markdown(f"Generate a mesh from an image with the pipeline `{Path(self.pipeline).name}`. Images: "
                            "RGBA with a transparent background, or RGB on a plain background."
                            if self.pipeline else NEEDS_PIPELINE)
                with gr.Row():
                    image = gr.Image(label="image", type="filepath", image_mode="RGBA")
                    with gr.Column():
                        gseed = gr.Number(0, precision=0, minimum=0, label="seed")
                        steps = gr.Slider(1, 100, value=50, step=1, label="sampling steps of each flow")
                        guidance = gr.Slider(0, 10, value=3.5, step=0.1, label="guidance")
                        with gr.Row():
                            gbtn = gr.Button("Generate", variant="primary", interactive=bool(self.pipeline))
                            gstop = gr.Button("Stop", variant="stop")
                with gr.Row():
                    gview = gr.Model3D(label="generated mesh", **VIEWER)
                    gfiles = gr.File(label="download", file_count="multiple", interactive=False)
                gviews = gr.Image(label="input and normal renders", type="filepath", interactive=False)
                gsummary = gr.Markdown(label="summary")
                gresult = gr.File(label="generated GLB", visible=False)
                ev4 = _job_event(gbtn, self.generate, [image, gseed, steps, guidance],
                                 [gresult, gviews, gfiles, gsummary], [(gresult, gview)], "generate")
                gstop.click(None, None, None, cancels=[ev4], api_name=False)
            demo.unload(self.end_session)
        return demo


def _job_event(button, fn, inputs: list, outputs: list, viewers: list, name: str):
    """``button`` runs the job ``fn`` (API name ``name``) in the shared one-at-a-time queue; when it succeeds, the
    3D viewers show the meshes it returned.

    The job's own outputs hold the meshes as (hidden) files, copied into the viewers by a second, instant step:
    a viewer set by a streaming job receives its final value twice (the last streamed update and the completion),
    and the 3D viewer of gradio 6 then stays empty."""
    event = button.click(fn, inputs, outputs, api_name=name, concurrency_id=QUEUE, concurrency_limit=1)
    event.success(lambda *paths: paths if len(paths) > 1 else paths[0], [src for src, _ in viewers],
                  [dst for _, dst in viewers], api_name=False, concurrency_limit=None, show_progress="hidden")
    return event


NEEDS_CHECKPOINT = ("This tab needs a VAE: start the app with `sparseflex app --checkpoint VAE` (the TripoSF release "
                    "file `pretrained_TripoSFVAE_256i1024o.safetensors` or a `sparseflex train vae` checkpoint).")
NEEDS_PIPELINE = ("This tab needs an image-to-3D pipeline: start the app with `sparseflex app --pipeline PIPE.json` "
                  "(written by `sparseflex pipeline save`).")


def _error(message: str) -> Exception:
    """The page's one-line message (not logged with a traceback: it is the user's mistake, not the server's)."""
    try:
        return gr.Error(message, print_exception=False)
    except TypeError:  # gradio 4
        return gr.Error(message)


def _seed_and_points():
    seed = gr.Number(0, precision=0, minimum=0, label="seed")
    points = gr.Slider(0, 1_000_000, value=100_000, step=10_000,
                       label="metric samples per mesh (0: no metrics)")
    return seed, points


def _mesh_outputs() -> tuple[list, list]:
    """The outputs of a mesh job (the input and result GLB files, hidden, then the metrics table, the normal renders,
    the downloads and a summary) and the (file, 3D viewer) pairs that show the meshes."""
    with gr.Row(equal_height=True):
        source = gr.Model3D(label="input", **VIEWER)
        result = gr.Model3D(label="result", **VIEWER)
    with gr.Row():
        metrics = gr.Dataframe(headers=["metric", "value", "perfect"], label="metrics against the input",
                               interactive=False)
        files = gr.File(label="download", file_count="multiple", interactive=False)
    views = gr.Image(label="normal renders: input (top row) and result, outside and interior views", type="filepath",
                     interactive=False)
    summary = gr.Markdown(label="summary")
    source_file = gr.File(label="input GLB", visible=False)
    result_file = gr.File(label="result GLB", visible=False)
    return [source_file, result_file, metrics, views, files, summary], [(source_file, source), (result_file, result)]


def _number(value, name: str, kind, low, high):
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise _error(f"{name} must be a number; got {value!r}") from None
    if not low <= number <= high:  # NaN fails too
        raise _error(f"{name} must be in [{low}, {high}]; got {value!r}")
    if kind is int and float(value) != number:
        raise _error(f"{name} must be a whole number; got {value!r}")
    return number


def _int(value, name: str, low: int, high: int) -> int:
    return _number(value, name, int, low, high)


def _float(value, name: str, low: float, high: float) -> float:
    return _number(value, name, float, low, high)


def _choice(value, choices: list, name: str):
    number = _int(value, name, min(choices), max(choices))
    if number not in choices:
        raise _error(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return number

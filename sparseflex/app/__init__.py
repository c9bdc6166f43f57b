"""The SparseFlex web app (``sparseflex app``, needs ``pip install sparseflex[app]``): convert, fit, reconstruct and
generate meshes in the browser, with a 3D viewer, metrics, normal renders and downloads.

The page (:mod:`sparseflex.app.ui`, Gradio) only calls the library's pipelines, through one worker process
(:mod:`sparseflex.app.jobs`). Importing this package imports neither gradio nor torch.

    from sparseflex.app import serve
    serve(port=7860, checkpoint="ckpts/pretrained_TripoSFVAE_256i1024o.safetensors")
"""

from __future__ import annotations

import atexit
import os
import signal
import tempfile
from pathlib import Path

from ..errors import InputError, OptionError, SparseFlexError

GRADIO_MISSING = "the app needs gradio: pip install sparseflex[app]"


def require_gradio() -> None:
    """Raise the one-line :class:`SparseFlexError` telling how to install gradio unless it is installed (without
    importing it: gradio reads its temporary folder when it is imported)."""
    import importlib.util
    try:
        found = importlib.util.find_spec("gradio") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise SparseFlexError(GRADIO_MISSING)


def check_models(checkpoint: str | None, pipeline: str | None) -> None:
    """One-line errors for model files that are not there (read by the worker only when a job needs them)."""
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise InputError(f"{checkpoint}: no such VAE checkpoint file")
    if pipeline is not None:
        from ..pipelines.generate import read_pipeline
        read_pipeline(pipeline)  # a readable pipeline file whose parts exist


def build(root: str | os.PathLike, checkpoint: str | None = None, pipeline: str | None = None, device: str = "cpu",
          max_upload_mb: int | None = None):
    """The app object (:class:`sparseflex.app.ui.SparseFlexApp`) and its ``gr.Blocks`` page, queue set up: one job at
    a time, the others waiting in line."""
    require_gradio()
    try:
        from .ui import DEFAULT_MAX_UPLOAD_MB, SparseFlexApp
    except ImportError as exc:  # installed but broken
        raise SparseFlexError(f"{GRADIO_MISSING} ({' '.join(str(exc).split())})") from None
    app = SparseFlexApp(root, checkpoint, pipeline, device, max_upload_mb or DEFAULT_MAX_UPLOAD_MB)
    demo = app.build()
    demo.queue(max_size=64, default_concurrency_limit=1)
    return app, demo


def serve(host: str = "127.0.0.1", port: int = 7860, checkpoint: str | None = None, pipeline: str | None = None,
          device: str | None = None, max_upload_mb: int | None = None) -> None:
    """Run the app until interrupted (Ctrl-C or SIGTERM); every uploaded and produced file lives under one temporary
    folder, removed when the app stops."""
    require_gradio()
    check_models(checkpoint, pipeline)
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(tempfile.mkdtemp(prefix="sparseflex-app-"))
    os.environ["GRADIO_TEMP_DIR"] = str(root / "uploads")  # gradio's copies of uploads and results, removed with root
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app, demo = build(root / "jobs", checkpoint, pipeline, device, max_upload_mb)
    removed = []

    def clean_up():
        if not removed:
            removed.append(True)
            app.close()
            import shutil
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(clean_up)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    app.worker.start()  # warms up (imports torch and the library) while the page starts
    try:
        demo.launch(**_launch_options(demo, host, port, root, app.max_upload_mb))
    except OSError as exc:
        if "port" in str(exc).lower():
            raise OptionError(f"cannot serve on {host}:{port}: the port is in use or not allowed; pick another "
                              "--port") from None
        raise
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            demo.close()
        except Exception:  # noqa: BLE001  (the server may not have started)
            pass
        clean_up()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _launch_options(demo, host: str, port: int, root: Path, max_upload_mb: int) -> dict:
    """``launch`` options, those a gradio 4 lacks left out."""
    import inspect
    known = inspect.signature(demo.launch).parameters
    options = {"server_name": host, "server_port": port, "show_error": True, "allowed_paths": [str(root)],
               "max_file_size": f"{max_upload_mb}mb", "ssr_mode": False}
    return {k: v for k, v in options.items() if k in known}

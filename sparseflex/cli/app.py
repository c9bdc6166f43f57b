"""`sparseflex app [--host 127.0.0.1] [--port 7860] [--checkpoint VAE] [--pipeline PIPE.json]`: the web app.

Tabs Convert / Fit, Reconstruct (VAE, with --checkpoint) and Generate (image to 3D, with --pipeline): upload, watch
the progress, inspect the result in a 3D viewer beside the input with metrics and normal renders, download GLB / PLY /
OBJ. Jobs run one at a time. Needs gradio: pip install sparseflex[app].
"""

from __future__ import annotations

from .common import device_option, number


def register(sub) -> None:
    p = sub.add_parser("app", help="the web app: convert, fit, reconstruct and generate in the browser",
                       description=__doc__)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1, this machine only; 0.0.0.0 for every network)")
    p.add_argument("--port", type=number(int, 1, 65535), default=7860, help="port (1..65535, default 7860)")
    p.add_argument("--checkpoint", default=None,
                   help="VAE weights for the Reconstruct tab: TripoSF .safetensors or a training checkpoint")
    p.add_argument("--pipeline", default=None, help="pipeline file for the Generate tab (sparseflex pipeline save)")
    p.add_argument("--device", type=device_option, default=None,
                   help="torch device of the jobs (default: cuda when available, else cpu)")
    p.add_argument("--max-upload-mb", type=number(int, 1, 100_000), default=200,
                   help="largest file a user may upload, in MB (default 200)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..app import serve
    serve(host=args.host, port=args.port, checkpoint=args.checkpoint, pipeline=args.pipeline, device=args.device,
          max_upload_mb=args.max_upload_mb)
    return 0

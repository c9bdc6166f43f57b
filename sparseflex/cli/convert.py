"""`sparseflex convert INPUT -o OUT.ply --resolution R`: mesh -> SparseFlex (no optimisation) -> mesh, with metrics."""

from __future__ import annotations

import json
import sys
import time

from .common import add_overwrite, metrics_points, number, output_path, seed_option


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a mesh to a SparseFlex and extract it (no optimisation)",
                       description=__doc__)
    p.add_argument("input", help="mesh file (OBJ, PLY, STL, OFF, GLB/GLTF)")
    p.add_argument("-o", "--output", required=True, help="output mesh (.ply, .obj or .glb), in the input's coordinates")
    p.add_argument("--resolution", type=number(int, 8, 2048), default=256,
                   help="grid resolution R (8..2048, default 256)")
    p.add_argument("--dilation", type=number(int, 0, 4), default=1,
                   help="voxel dilation around the surface (0..4, default 1)")
    p.add_argument("--points", type=number(int, 1, 1 << 28), default=None,
                   help="surface samples for the SDF (default: automatic)")
    p.add_argument("--no-thin-sheets", action="store_true",
                   help="do not keep plates and gaps thinner than a voxel (the plain oriented-point SDF)")
    p.add_argument("--no-metrics", action="store_true", help="skip the metrics against the input")
    p.add_argument("--seed", type=seed_option, default=0)
    p.add_argument("--metrics-points", type=metrics_points, default=300_000,
                   help="samples per mesh for the metrics against the input (1,000..20,000,000, default 300,000)")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.mesh import SAVE_FORMATS, Mesh, load_mesh, normalize, save_mesh
    from ..eval.resources import peak_memory_bytes
    from ..eval.topology import topology_report, topology_warning
    from ..fit.convert import mesh_to_sparseflex

    out = output_path(args.output, args.overwrite, SAVE_FORMATS)
    start = time.perf_counter()
    mesh = load_mesh(args.input)
    normed, transform = normalize(mesh)
    sf = mesh_to_sparseflex(normed, args.resolution, dilation=args.dilation, num_points=args.points, seed=args.seed,
                            thin_sheets=not args.no_thin_sheets)
    ex = sf.extract()
    result = Mesh(transform.invert(ex.vertices), ex.faces)
    save_mesh(out, result)
    peak = peak_memory_bytes()
    report = {"output": str(out), "resolution": args.resolution, "voxels": sf.num_voxels,
              "vertices": len(result.vertices), "faces": len(result.faces),
              "seconds": round(time.perf_counter() - start, 2), "peak_memory_gb": round(peak / 1e9, 2),
              "bytes_per_voxel": round(peak / max(sf.num_voxels, 1))}  # peak resident memory / voxels
    report["topology"] = topology_report(result, mesh)
    if not args.no_metrics:
        from ..eval.metrics import mesh_metrics
        report["metrics"] = mesh_metrics(result, mesh, num_points=args.metrics_points, seed=args.seed)
    warning = topology_warning(report["topology"])
    if warning:
        print(warning, file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0

"""`sparseflex metrics PRED GT`: Chamfer distance, F-scores and normal consistency of PRED against GT, and whether PRED
is watertight with as many boundary loops and components as GT, as JSON."""

from __future__ import annotations

import json

from .common import metrics_points, seed_option


def register(sub) -> None:
    p = sub.add_parser("metrics", help="compare a mesh with a ground truth (point-to-surface protocol)",
                       description=__doc__)
    p.add_argument("pred", help="predicted mesh")
    p.add_argument("gt", help="ground-truth mesh")
    p.add_argument("--points", type=metrics_points, default=300_000,
                   help="samples per mesh (1,000..20,000,000, default 300,000)")
    p.add_argument("--seed", type=seed_option, default=0)
    p.add_argument("--no-ceiling", action="store_true", help="skip the ground truth against itself")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.mesh import load_mesh
    from ..eval.metrics import mesh_metrics
    from ..eval.topology import topology_report

    pred, gt = load_mesh(args.pred), load_mesh(args.gt)
    result = mesh_metrics(pred, gt, num_points=args.points, seed=args.seed, ceiling=not args.no_ceiling)
    result["topology"] = topology_report(pred, gt, names=("prediction", "reference"))
    print(json.dumps(result, indent=2))
    return 0

"""`sparseflex metrics PRED GT`: Chamfer distance, F-scores and normal consistency of PRED against GT, as JSON."""

from __future__ import annotations

import json

from ..errors import check_range
from .common import positive_int


def register(sub) -> None:
    p = sub.add_parser("metrics", help="compare a mesh with a ground truth (point-to-surface protocol)",
                       description=__doc__)
    p.add_argument("pred", help="predicted mesh")
    p.add_argument("gt", help="ground-truth mesh")
    p.add_argument("--points", type=positive_int, default=300_000, help="samples per mesh (default 300,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ceiling", action="store_true", help="skip the ground truth against itself")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.mesh import load_mesh
    from ..eval.metrics import mesh_metrics

    check_range("--points", args.points, 1000, 20_000_000)
    result = mesh_metrics(load_mesh(args.pred), load_mesh(args.gt), num_points=args.points, seed=args.seed,
                          ceiling=not args.no_ceiling)
    print(json.dumps(result, indent=2))
    return 0

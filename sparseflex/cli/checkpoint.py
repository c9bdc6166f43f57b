"""`sparseflex checkpoint upgrade`: convert a checkpoint of an older sparseflex to the current, safely loaded format.

    sparseflex checkpoint upgrade OLD NEW --trust [--overwrite]
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint maintenance (upgrade old training and fit checkpoints)",
                       description=__doc__.splitlines()[0])
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    u = actions.add_parser("upgrade", help="convert an older training or fit checkpoint to the current format",
                           description="Convert a training or fit checkpoint written by an older sparseflex (numpy "
                                       "random states) to the current format, which loads without running code.")
    u.add_argument("old", metavar="OLD", help="the old checkpoint (.pt)")
    u.add_argument("new", metavar="NEW", help="where to write the converted checkpoint (may be OLD, with --overwrite)")
    u.add_argument("--trust", action="store_true",
                   help="required: the converted file is then trusted as ours (the old one is read weights-only, "
                        "numpy arrays allowed, so no code in it runs); give it only for a checkpoint you wrote")
    u.add_argument("--overwrite", action="store_true", help="replace NEW if it exists")
    u.set_defaults(func=run_upgrade)


def run_upgrade(args) -> int:
    from ..models.checkpoint import upgrade_checkpoint
    new = upgrade_checkpoint(args.old, args.new, trust=args.trust, overwrite=args.overwrite)
    print(f"wrote {new}")
    return 0

"""`sparseflex render INPUT -o OUTDIR`: normal and depth maps of a mesh from evenly spread views, as a PNG grid and as
arrays (views.npz) with every camera, in the normalised frame, for checking with any ray caster."""

from __future__ import annotations

import json
import time

from .common import add_overwrite, new_dir, number, output_dir, output_path

#: Stored in views.npz so the file explains itself.
CONVENTION = ("normalised frame (bounding-box centre at 0, longest side 1; input = normalised / "
              "normalization_scale + normalization_center); OpenCV cameras: x right, y down, "
              "z forward; world-to-camera extrinsics; pixel (row i, column j) has its centre at (u, v) = (j, i); "
              "depth = camera-space z of the first surface hit with near <= z <= far, 0 where none; normals are "
              "camera-space face normals turned towards the camera; maps are not anti-aliased")


def register(sub) -> None:
    p = sub.add_parser("render", help="render normal and depth maps of a mesh (PNG grid + views.npz)",
                       description=__doc__)
    p.add_argument("input", help="mesh file (OBJ, PLY, STL, OFF, GLB/GLTF)")
    p.add_argument("-o", "--output", required=True, help="output folder (views.png, views.npz)")
    p.add_argument("--views", type=number(int, 1, 256), default=8,
                   help="number of views on a sphere (1..256, default 8)")
    p.add_argument("--size", type=number(int, 8, 4096), default=512,
                   help="image width and height in pixels (8..4096, default 512)")
    p.add_argument("--radius", type=number(float, 0.9, 100.0), default=2.0,
                   help="camera distance from the centre (0.9..100, default 2)")
    p.add_argument("--fov", type=number(float, 1.0, 170.0), default=40.0,
                   help="field of view in degrees (1..170, default 40)")
    p.add_argument("--backend", choices=["auto", "torch", "embree"], default="auto",
                   help="visibility backend (default: embree on CPU when available, else torch)")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import torch

    from ..data.mesh import load_mesh, normalize
    from ..io import atomic_path
    from ..render.camera import sphere_views
    from ..render.images import depth_to_rgb, image_grid, normal_to_rgb
    from ..render.maps import render

    out_dir = output_dir(args.output)
    png_path = output_path(out_dir / "views.png", args.overwrite)
    npz_path = output_path(out_dir / "views.npz", args.overwrite)
    start = time.perf_counter()
    mesh, transform = normalize(load_mesh(args.input))
    cams = sphere_views(args.views, radius=args.radius, fov=args.fov, size=args.size)
    with torch.no_grad():
        maps = render(mesh.vertices.float(), mesh.faces, cams, backend=args.backend, antialias_edges=False)
    mask, depth, normal = maps["mask"], maps["depth"], maps["normal"]

    row_normal = [normal_to_rgb(normal[b], mask[b]) for b in range(len(cams))]
    row_depth = [depth_to_rgb(depth[b], mask[b]) for b in range(len(cams))]
    grid = image_grid([row_normal, row_depth], ["normal", "depth"], [f"view {b}" for b in range(len(cams))])
    # both files appear together, under unique temporary names until then; a folder made here goes if that fails
    with new_dir(out_dir), atomic_path(npz_path) as npz_tmp, atomic_path(png_path) as png_tmp:
        np.savez_compressed(npz_tmp, mask=mask.bool().numpy(), depth=depth.float().numpy(),
                            normal=normal.float().numpy(), K=cams.K.numpy(), extrinsics=cams.extrinsics.numpy(),
                            near=cams.near.numpy(), far=cams.far.numpy(),
                            normalization_center=transform.center.numpy(),
                            normalization_scale=np.float64(transform.scale), convention=np.array(CONVENTION))
        grid.save(png_tmp, format="PNG")
    print(json.dumps({"png": str(png_path), "npz": str(npz_path), "views": args.views, "size": args.size,
                      "faces": len(mesh.faces), "coverage": round(float(mask.mean()), 4),
                      "seconds": round(time.perf_counter() - start, 2)}, indent=2))
    return 0

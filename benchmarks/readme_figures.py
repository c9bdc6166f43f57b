"""The README's pictures that no other script writes: the overview (ground truth, fit and convert of an open and an
interior shape), the render of the dress and the contact sheet of a prepared folder.

    python benchmarks/readme_figures.py [--root ../shared/data/meshes] [-o docs] [--only overview,render,contact]

- ``overview.png``: the dress (open) and the armchair (interiors) at 128^3: ground truth, ``fit`` (150 steps, from
  ``convert``) and ``convert``, normal maps from 4 outside views and 2 views inside the shape;
- ``render_dress.png``: ``sparseflex render`` of the dress (4 views, 192 px), its ``views.png``;
- ``data_contact_sheet.png``: ``sparseflex data prepare`` of 8 shared meshes (resolution 32, 4 views) then
  ``sparseflex data stats``, its ``contact_sheet.png``.

Prints the seconds of each part and the fit's and convert's F-score@0.001 against the input.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparseflex.data.mesh import Mesh, load_mesh, normalize
from sparseflex.eval.metrics import mesh_metrics
from sparseflex.fit.convert import mesh_to_sparseflex
from sparseflex.fit.fitter import FitConfig, Fitter
from sparseflex.fit.report import comparison_views
from sparseflex.render.images import image_grid, normal_to_rgb, save_png
from sparseflex.render.maps import render

ROOT = Path(__file__).resolve().parents[2] / "shared/data/meshes"
OVERVIEW = [("dress", "open/dc_dress_v7k.obj"), ("armchair", "interior/kaolin_armchair.obj")]
CONTACT = ["closed/ajc_spot.obj", "closed/ddg_kitten.obj", "closed/tm_featuretype.STL", "open/dc_dress_v7k.obj",
           "open/dc_tshirt1900.obj", "open/gc_moebius.obj", "interior/kaolin_armchair.obj",
           "interior/tm_CesiumMilkTruck.glb"]


def _mesh(sf):
    out = sf.extract()
    return Mesh(out.vertices.detach(), out.faces)


def overview(root: Path, out: Path, resolution: int = 128, iterations: int = 150, size: int = 160) -> None:
    rows, labels = [], []
    for name, rel in OVERVIEW:
        gt, _ = normalize(load_mesh(root / rel))
        start = time.perf_counter()
        converted = _mesh(mesh_to_sparseflex(gt, resolution))
        t_convert = time.perf_counter() - start
        start = time.perf_counter()
        fitted = _mesh(Fitter(gt, FitConfig(resolution=resolution, iterations=iterations)).run())
        t_fit = time.perf_counter() - start
        scores = {k: mesh_metrics(m, gt, num_points=100_000)["fscore@0.001"] for k, m in
                  (("fit", fitted), ("convert", converted))}
        print(f"  {name}: convert {t_convert:.1f} s, fit {t_fit:.1f} s; F@0.001 fit {scores['fit']:.2f} %, "
              f"convert {scores['convert']:.2f} %", flush=True)
        cams = comparison_views(gt, size, interior=2)
        for label, mesh in (("ground truth", gt), (f"fit {resolution}", fitted), (f"convert {resolution}", converted)):
            with torch.no_grad():
                maps = render(mesh.vertices, mesh.faces, cams, allow_empty=True)
            rows.append([normal_to_rgb(maps["normal"][b], maps["mask"][b]) for b in range(len(cams))])
            labels.append(f"{name}: {label}")
    cols = [f"outside {i}" for i in range(4)] + [f"inside {i}" for i in range(2)]
    save_png(image_grid(rows, labels, cols), out / "overview.png")


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sparseflex", *args], check=True, stdout=subprocess.DEVNULL)


def render_dress(root: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _cli("render", str(root / OVERVIEW[0][1]), "-o", f"{tmp}/r", "--views", "4", "--size", "192")
        shutil.copy(f"{tmp}/r/views.png", out / "render_dress.png")


def contact_sheet(root: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        meshes = Path(tmp, "meshes")
        meshes.mkdir()
        for rel in CONTACT:
            (meshes / Path(rel).name).symlink_to(root / rel)
        _cli("data", "prepare", str(meshes), f"{tmp}/data", "--resolution", "32", "--views", "4")
        _cli("data", "stats", f"{tmp}/data")
        shutil.copy(f"{tmp}/data/contact_sheet.png", out / "data_contact_sheet.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT), help="folder of the shared mesh groups")
    ap.add_argument("-o", "--out", default="docs")
    ap.add_argument("--only", default="overview,render,contact")
    args = ap.parse_args()
    root, out = Path(args.root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part, fn in (("overview", overview), ("render", render_dress), ("contact", contact_sheet)):
        if part in args.only.split(","):
            start = time.perf_counter()
            print(f"{part} ...", flush=True)
            fn(root, out)
            print(f"{part}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()

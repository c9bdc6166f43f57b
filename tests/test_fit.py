"""Per-shape fitting: convert and fit reach high F-scores on closed and open shapes, resume is exact, CLI works."""

import json

import numpy as np
import pytest
import torch
import trimesh

from sparseflex.cli import main
from sparseflex.data.mesh import Mesh, normalize, save_mesh
from sparseflex.eval.metrics import mesh_metrics
from sparseflex.eval.topology import boundary_edges, euler_characteristic
from sparseflex.fit.convert import mesh_to_sparseflex
from sparseflex.fit.fitter import FitConfig, Fitter, load_checkpoint, save_checkpoint


def sphere_mesh():
    return normalize(Mesh.from_trimesh(trimesh.creation.icosphere(4, radius=0.4)))[0]


def open_sheet(n=40):
    """A half cylinder: an open surface with one boundary loop."""
    th, z = np.meshgrid(np.linspace(0, np.pi, n), np.linspace(-0.5, 0.5, n), indexing="ij")
    v = np.stack([0.4 * np.cos(th), 0.4 * np.sin(th), z], -1).reshape(-1, 3)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    f = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return normalize(Mesh(torch.tensor(v, dtype=torch.float32), torch.tensor(f)))[0]


def fitted_metrics(sf, gt):
    ex = sf.extract()
    return mesh_metrics(Mesh(ex.vertices.detach(), ex.faces), gt, num_points=50_000, ceiling=False), ex


SMALL = dict(resolution=32, start_resolution=16, iterations=16, image_size=96, checkpoint_every=0)


def test_convert_open_surface_stays_open_and_single_layered():
    gt = open_sheet()
    m, ex = fitted_metrics(mesh_to_sparseflex(gt, 64), gt)
    assert m["fscore@0.01"] >= 99 and m["normal_consistency"] >= 0.95
    assert len(boundary_edges(ex.faces)) > 0
    # single layer: the area matches the sheet's (a watertight shell would double it)
    area = Mesh(ex.vertices, ex.faces).area
    assert area == pytest.approx(gt.area, rel=0.05)


@pytest.mark.parametrize("make, closed", [(sphere_mesh, True), (open_sheet, False)])
def test_fit_small(make, closed):
    gt = make()
    sf = Fitter(gt, FitConfig(**SMALL)).run()
    assert sf.resolution == 32
    m, ex = fitted_metrics(sf, gt)
    assert m["fscore@0.01"] >= 99
    assert m["normal_consistency"] >= 0.95
    if closed:
        assert len(boundary_edges(ex.faces)) == 0 and euler_characteristic(ex.faces) == 2
    else:
        assert len(boundary_edges(ex.faces)) > 0


def test_fit_beats_its_convert_initialisation_on_every_metric():
    """Sharp edges are what oriented-point SDFs miss and rendering losses recover (with the deformation)."""
    gt = normalize(Mesh.from_trimesh(trimesh.creation.box((0.8, 0.6, 0.5)).subdivide().subdivide()))[0]
    before, _ = fitted_metrics(mesh_to_sparseflex(gt, 32), gt)
    after, _ = fitted_metrics(Fitter(gt, FitConfig(resolution=32, iterations=40, image_size=96,
                                                   checkpoint_every=0)).run(), gt)
    assert after["chamfer"] < before["chamfer"] / 2
    for key in ("fscore@0.001", "fscore@0.01", "normal_consistency"):
        assert after[key] > before[key], key


def test_seen_voxels_follow_the_first_surface():
    """Two parallel squares facing a camera on the z axis: the front square's voxels are seen, the back square's
    are hidden where the front one covers them and seen beside it."""
    from sparseflex.fit.sectional import seen_voxels
    from sparseflex.render import render
    from sparseflex.render.camera import Camera, intrinsics, look_at
    front = trimesh.creation.box((0.4, 0.4, 0.01))
    front.apply_translation((0, 0, 0.2))
    back = trimesh.creation.box((0.9, 0.9, 0.01))
    back.apply_translation((0, 0, -0.2))
    mesh = Mesh.from_trimesh(trimesh.util.concatenate([front, back]))
    cam = Camera(intrinsics(40.0, 64, 64)[None], look_at(torch.tensor([[0.0, 0.0, 2.0]]), torch.zeros(1, 3)),
                 64, 64, 0.1, 10.0)
    maps = render(mesh.vertices, mesh.faces, cam)
    xy = torch.linspace(-0.4, 0.4, 9)
    gx, gy = torch.meshgrid(xy, xy, indexing="ij")
    plane = torch.stack([gx.ravel(), gy.ravel()], 1)
    pts = torch.cat([torch.cat([plane, torch.full((81, 1), 0.2)], 1), torch.cat([plane, torch.full((81, 1), -0.2)], 1),
                     torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.195]])])
    seen = seen_voxels(pts, cam, maps, tolerance=0.02)
    covered = (plane.abs() < 0.18).all(1)
    assert seen[:81].all()                            # the front plane (its square and the air around it)
    assert not seen[81:162][covered].any()            # the back plane behind the front square
    assert seen[81:162][(plane.abs() > 0.22).any(1)].all()  # the back plane beside it
    assert not seen[162] and seen[163]                # between the planes: hidden; on the front one: seen


def test_regularisers_leave_hidden_surfaces_alone():
    """An inner sphere no view sees gets no gradient from the FlexiCubes regularisers (nothing would oppose them,
    and Adam would move it at its full rate); the outer one does."""
    from sparseflex.fit.sectional import sectional_render_loss
    from sparseflex.losses import RenderLossWeights
    from sparseflex.render import sphere_views
    outer = trimesh.creation.icosphere(3, radius=0.4)
    inner = trimesh.creation.icosphere(3, radius=0.2)
    gt = Mesh.from_trimesh(trimesh.util.concatenate([outer, inner]))
    sf = mesh_to_sparseflex(gt, 32)
    for name in ("alpha_raw", "beta_raw", "gamma_raw", "sdf", "deform"):
        getattr(sf, name).requires_grad_(True)
    no_render = RenderLossWeights(mask=0, depth=0, normal=0, ssim=0)
    loss, parts = sectional_render_loss(sf, gt, sphere_views(1, radius=1.5, size=64), 1.0, 0.0, no_render,
                                        dev=0.5, sign=0.01, l1=1e-3)
    loss.backward()
    radius = sf.voxel_centers().norm(dim=1)
    grad = sf.alpha_raw.grad.abs().sum(1) + sf.beta_raw.grad.abs().sum(1) + sf.gamma_raw.grad.abs()
    assert grad[radius < 0.3].abs().sum() == 0
    assert grad[radius > 0.35].abs().sum() > 0
    corner_radius = sf.corner_positions().detach().norm(dim=1)
    assert sf.sdf.grad[corner_radius < 0.27].abs().sum() == 0


def test_a_dropped_fitter_frees_its_optimiser_at_once():
    """No reference cycle keeps the optimiser's moments alive once the fitter is gone (the CLI frees it before the
    final extraction and the metrics: at 1024 that is gigabytes), even with the cycle collector off."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        fitter = Fitter(sphere_mesh(), FitConfig(**{**SMALL, "iterations": 4}))
        sf = fitter.run()
        moments = weakref.ref(fitter.optimizer.moments[0][0])
        del fitter
        assert moments() is None
        assert sf.num_voxels > 0
    finally:
        gc.enable()


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    gt = sphere_mesh()
    cfg = FitConfig(**{**SMALL, "iterations": 8, "checkpoint_every": 5})  # stages: 4 steps at 16, 4 at 32
    full = Fitter(gt, cfg).run()

    def interrupt(state):  # save as the CLI does, then stop mid-way through the second stage
        save_checkpoint(tmp_path / "ck.pt", state, cfg)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Fitter(gt, cfg).run(on_checkpoint=interrupt)
    state, cfg2 = load_checkpoint(tmp_path / "ck.pt")
    assert state.step == 5 and state.sf.resolution == 32
    resumed = Fitter(gt, cfg2, state).run()
    assert torch.equal(resumed.coords, full.coords)
    for name in ("sdf", "deform", "alpha_raw", "beta_raw", "gamma_raw"):
        assert (getattr(resumed, name) - getattr(full, name)).abs().max() < 1e-5, name


def test_fit_cli_outputs_and_resume(tmp_path, capsys):
    src = tmp_path / "sphere.obj"
    m = Mesh.from_trimesh(trimesh.creation.icosphere(3, radius=2.0))
    m.vertices += torch.tensor([5.0, -1.0, 2.0])  # not normalised: outputs must come back in these coordinates
    save_mesh(src, m)
    out = tmp_path / "fit"
    args = ["fit", str(src), "-o", str(out), "--resolution", "32", "--start-resolution", "16", "--iterations", "6",
            "--image-size", "64", "--checkpoint-every", "2", "--metrics-points", "20000", "--quiet"]
    assert main(args) == 0
    for name in ["mesh.ply", "metrics.json", "comparison.png", "loss.png", "checkpoint.pt"]:
        assert (out / name).exists(), name
    report = json.loads((out / "metrics.json").read_text())
    assert report["resolution"] == 32 and report["faces"] > 0
    assert report["bytes_per_voxel"] == pytest.approx(report["peak_memory_gb"] * 1e9 / report["voxels"], rel=0.05)
    assert report["metrics"]["fscore@0.01"] > 90
    fitted = trimesh.load(out / "mesh.ply", process=False)
    assert np.allclose(fitted.bounds.mean(0), [5.0, -1.0, 2.0], atol=0.1)
    capsys.readouterr()
    # a second run refuses to overwrite; --resume extends the finished run
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    resume = [a if a != "6" else "8" for a in args] + ["--resume"]  # --iterations 8 extends the finished run
    assert main(resume) == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 8


def test_fit_cli_bfloat16_moments(tmp_path):
    """--moments bfloat16 stores the optimiser's moments in bfloat16, in memory and in the checkpoint."""
    src = tmp_path / "sphere.obj"
    save_mesh(src, Mesh.from_trimesh(trimesh.creation.icosphere(2)))
    out = tmp_path / "fit"
    assert main(["fit", str(src), "-o", str(out), "--resolution", "16", "--iterations", "2", "--image-size", "32",
                 "--metrics-points", "2000", "--moments", "bfloat16", "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["moments"] == "bfloat16"
    state, config = load_checkpoint(out / "checkpoint.pt")
    assert config.moment_dtype == "bfloat16"
    moments = [t for m in state.optimizer_state["moments"] if m is not None for t in m.values()]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments)


@pytest.mark.parametrize("content, message", [(None, "no such file"), (b"", "empty"),
                                              (b"v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n", "NaN")])
def test_fit_cli_bad_input(tmp_path, capsys, content, message):
    path = tmp_path / "bad.obj"
    if content is not None:
        path.write_bytes(content)
    assert main(["fit", str(path), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert message.lower() in err.lower()


def test_fit_cli_bad_options(tmp_path, capsys):
    src = tmp_path / "s.obj"
    save_mesh(src, sphere_mesh())
    for opts in (["--resolution", "100"], ["--visibility-ratio", "1.5"], ["--iterations", "-3"],
                 ["--image-size", "-64"], ["--image-size", "8"]):
        assert main(["fit", str(src), "-o", str(tmp_path / "o"), "--quiet", *opts]) == 2
        assert capsys.readouterr().err.startswith("error:")


def test_automatic_settings_follow_the_final_resolution():
    assert [FitConfig(resolution=r).size() for r in (64, 256, 512, 1024)] == [256, 256, 256, 512]
    assert FitConfig(resolution=1024, image_size=128).size() == 128
    assert [FitConfig(resolution=r).ratio(r) for r in (256, 512, 1024)] == [1.0, 0.3, 0.1]
    gt = normalize(sphere_mesh())[0]
    assert Fitter(gt, FitConfig(resolution=16, iterations=0)).sampler.size == 256

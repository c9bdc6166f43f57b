"""Resolution 2048 (issue 20): convert accepts it and a small analytic shape converts exactly at that resolution."""

import json

import numpy as np
import torch

from sparseflex.cli import main
from sparseflex.data.mesh import Mesh, load_mesh, normalize, save_mesh
from sparseflex.eval.metrics import mesh_metrics
from sparseflex.fit.fitter import FitConfig, default_image_size
from sparseflex.fit.views import ViewSampler


def sliver():
    """One long thin triangle (open): about 30k voxels at 2048 once normalised."""
    v = torch.tensor([[-0.5, -0.004, 0.0], [0.5, 0.0, 0.01], [-0.5, 0.004, 0.02]])
    return Mesh(v, torch.tensor([[0, 1, 2]]))


def test_convert_at_2048(tmp_path, capsys):
    src, out = tmp_path / "sliver.obj", tmp_path / "out.ply"
    save_mesh(src, sliver())
    # a planar shape: the tangent-plane SDF is exact with few samples (2 per surface voxel), which keeps it fast
    assert main(["convert", str(src), "-o", str(out), "--resolution", "2048", "--points", "300000",
                 "--metrics-points", "20000"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["resolution"] == 2048
    # the triangle (normalised: 1 x 0.008) touches about 2048 x 16 voxels, x3 with the dilation
    assert 30_000 < report["voxels"] < 200_000
    assert report["faces"] > 0 and report["bytes_per_voxel"] > 0
    assert report["metrics"]["fscore@0.001"] >= 99 and report["metrics"]["normal_consistency"] >= 0.99
    # the extracted sheet lies on the triangle's plane, within a fraction of a 2048 voxel
    got = load_mesh(out)
    gt = sliver()
    n = torch.linalg.cross(gt.vertices[1] - gt.vertices[0], gt.vertices[2] - gt.vertices[0])
    n = n / n.norm()
    dist = ((got.vertices - gt.vertices[0]) @ n).abs()
    assert float(np.quantile(dist.numpy(), 0.99)) < 0.5 / 2048  # input units: the cube edge is 1, as normalised


def test_fit_settings_at_2048():
    cfg = FitConfig(resolution=2048).validate()
    assert cfg.ratio(2048) <= 0.1 and default_image_size(2048) >= 512
    gt, _ = normalize(sliver())
    sampler = ViewSampler(gt.vertices, torch.zeros_like(gt.vertices) + torch.tensor([0.0, 0.0, 1.0]), 64,
                          generator=torch.Generator().manual_seed(0), resolution=2048)
    kind, cam = sampler.sample("zoom")
    assert kind == "zoom" and cam.width == 64

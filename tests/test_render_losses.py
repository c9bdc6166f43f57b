"""Rendering losses: SSIM against scikit-image, masked depth, weights, LPIPS only when a network is given."""

import pytest
import torch

from sparseflex.errors import OptionError
from sparseflex.losses import RenderLossWeights, masked_l1, render_loss, ssim

skimage_metrics = pytest.importorskip("skimage.metrics")


def test_ssim_matches_scikit_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 36, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    ours = ssim(x, y, data_range=2.0).item()
    ref = sum(skimage_metrics.structural_similarity(x[b, c].numpy(), y[b, c].numpy(), data_range=2.0,
                                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
              for b in range(2) for c in range(3)) / 6
    assert ours == pytest.approx(ref, abs=1e-6)
    assert ssim(x, x, data_range=2.0).item() == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(OptionError, match="smaller than"):
        ssim(x[..., :5, :5], y[..., :5, :5])


def _maps(seed, b=2, h=24, w=24):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, h, w, generator=g) > 0.4).double()
    n = torch.nn.functional.normalize(torch.randn(b, h, w, 3, generator=g, dtype=torch.float64), dim=-1)
    return {"mask": mask, "depth": (1 + torch.rand(b, h, w, generator=g, dtype=torch.float64)) * mask,
            "normal": n * mask[..., None]}


def test_render_loss_parts_and_weights(device):
    pred, gt = _maps(1), _maps(2)
    on_device = render_loss({k: t.to(device) for k, t in pred.items()}, {k: t.to(device) for k, t in gt.items()})
    total, parts = render_loss(pred, gt)
    assert {t.device.type for t in [on_device[0], *on_device[1].values()]} == {device.type}
    assert all(on_device[1][k].item() == pytest.approx(v.item(), rel=1e-9) for k, v in parts.items())
    assert set(parts) == {"mask", "depth", "normal", "ssim"}
    assert total == pytest.approx(sum(p.item() for p in parts.values()))
    m = gt["mask"] > 0
    assert parts["mask"].item() == pytest.approx((pred["mask"] - gt["mask"]).abs().mean().item())
    assert parts["depth"].item() == pytest.approx(10 * (pred["depth"] - gt["depth"]).abs()[m].mean().item())
    assert parts["normal"].item() == pytest.approx((pred["normal"] - gt["normal"]).abs().mean().item())
    assert parts["ssim"].item() == pytest.approx(
        0.2 * (1 - ssim(pred["normal"].permute(0, 3, 1, 2), gt["normal"].permute(0, 3, 1, 2), 2.0)).item())
    # Depth only counts where the ground truth has a surface.
    moved = dict(pred, depth=torch.where(m, pred["depth"], pred["depth"] + 5))
    assert render_loss(moved, gt)[1]["depth"] == pytest.approx(parts["depth"].item())
    assert masked_l1(pred["depth"], gt["depth"], torch.zeros_like(m)).item() == 0
    total0, parts0 = render_loss(pred, gt, RenderLossWeights(mask=0, depth=0, normal=0, ssim=0))
    assert parts0 == {} and total0.item() == 0


def test_lpips_needs_a_network_and_uses_it():
    pred, gt = _maps(3), _maps(4)
    with pytest.raises(OptionError, match="perceptual network"):
        render_loss(pred, gt, RenderLossWeights(lpips=0.5))
    seen = []

    def fake_network(a, b):
        seen.append((a.shape, b.shape))
        return (a - b).pow(2).mean(dim=(1, 2, 3))

    _, parts = render_loss(pred, gt, RenderLossWeights(lpips=0.5), lpips=fake_network)
    assert seen == [((2, 3, 24, 24), (2, 3, 24, 24))]
    assert parts["lpips"].item() == pytest.approx(0.5 * (pred["normal"] - gt["normal"]).pow(2).mean().item())

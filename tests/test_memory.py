"""Memory per voxel (issue 20): the chunked per-voxel passes of sectioning give what one pass gives."""

import torch

import sparseflex.render.frustum as frustum
from sparseflex.render import random_views, section, zoom_views


def test_chunked_sectioning_equals_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(20_000, 3, generator=g) - 0.5
    cams = [random_views(1, g, size=64), zoom_views(pts, 1, g, size=64)]
    whole = [section(pts, cam, 0.1, offset=0.3, margin=0.01) for cam in cams]
    monkeypatch.setattr(frustum, "CHUNK", 777)  # many chunks, the last one partial
    for cam, (cam_ref, mask_ref) in zip(cams, whole):
        cam_got, mask_got = section(pts, cam, 0.1, offset=0.3, margin=0.01)
        assert torch.equal(mask_got, mask_ref) and 0 < mask_ref.sum() < len(pts)
        assert torch.equal(cam_got.near, cam_ref.near) and torch.equal(cam_got.far, cam_ref.far)

"""Frustum-aware sectional voxels (SPEC section 3): a voxel is active for a view when its centre lies inside the
view's clip volume; adaptive near/far planes make about a chosen fraction of all voxels active.

Ground truth must be rendered with the same cameras and planes (``camera.with_planes(near, far)``), so both the
prediction and the target are clipped alike.
"""

from __future__ import annotations

import torch

from ..errors import OptionError, check_range
from .camera import Camera


#: points per chunk of the per-point passes (their temporaries stay bounded: issue 20)
CHUNK = 1 << 20


def frustum_mask(points: torch.Tensor, camera: Camera) -> torch.Tensor:
    """``[B, N]`` bool: point n lies inside view b's clip volume (``-w <= x, y, z <= w`` after the MVP, w > 0)."""
    pts = points.reshape(-1, 3)
    mvp = camera.mvp().to(pts)
    out = torch.empty(len(camera), len(pts), dtype=torch.bool, device=pts.device)
    for start in range(0, len(pts), CHUNK):
        clip = torch.einsum("bij,nj->bni", mvp[:, :, :3], pts[start:start + CHUNK]) + mvp[:, None, :, 3]
        w = clip[..., 3]
        out[:, start:start + CHUNK] = (w > 0) & (clip[..., :3].abs() <= w[..., None]).all(-1)
    return out


class _Ranked:
    """Exact order statistics of ``values`` without sorting them all: ``self[i]`` is the i-th smallest and
    :meth:`searchsorted` counts the values below (or up to) a value, as on the sorted tensor.

    The values are bucketed by a histogram (bucket index is monotone in the value), so a rank query sorts only one
    bucket: a few O(N) passes instead of an O(N log N) sort of a million depths every training step.
    """

    BUCKETS = 4096

    def __init__(self, values: torch.Tensor):
        self.values = values
        self.n = len(values)
        if self.n == 0:
            return
        lo, hi = values.min(), values.max()
        scale = (self.BUCKETS - 1) / (hi - lo) if hi > lo else values.new_zeros(())
        self.bucket = ((values - lo) * scale).to(torch.int16)  # < 4096: 2 bytes per point, not 8
        counts = torch.bincount(self.bucket.long(), minlength=self.BUCKETS) if len(values) < CHUNK else sum(
            torch.bincount(self.bucket[i:i + CHUNK].long(), minlength=self.BUCKETS)
            for i in range(0, len(values), CHUNK))
        self.ends = torch.cumsum(counts, 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        i = i + self.n if i < 0 else i
        b = int(torch.searchsorted(self.ends, torch.tensor(i, device=self.ends.device), right=True))
        first = int(self.ends[b - 1]) if b > 0 else 0
        return torch.sort(self.values[self.bucket == b]).values[i - first]

    def searchsorted(self, value: torch.Tensor, right: bool = False) -> int:
        return int((self.values <= value).sum() if right else (self.values < value).sum())


def _side_depths(points: torch.Tensor, camera: Camera, b: int, min_near: float) -> _Ranked:
    """Camera-space depths of the points inside view b's side planes (left, right, top, bottom), by rank."""
    view = camera[b]
    proj = view.projection()[0].to(points)
    inside = []
    for start in range(0, len(points), CHUNK):
        cam = view.world_to_camera(points[start:start + CHUNK])[0]
        z = cam[:, 2]
        cx = cam[:, 0] * proj[0, 0] + cam[:, 1] * proj[0, 1] + z * proj[0, 2]
        cy = cam[:, 1] * proj[1, 1] + z * proj[1, 2]
        inside.append(z[(z > min_near) & (cx.abs() <= z) & (cy.abs() <= z)])
    return _Ranked(torch.cat(inside) if inside else points.new_zeros(0))


def _boundary(zs: _Ranked, index: int) -> int:
    """The index nearest to ``index`` where a plane can pass between zs[index - 1] and zs[index] (no tie across)."""
    if index <= 0 or index >= len(zs) or zs[index - 1] < zs[index]:
        return index
    value = zs[index]
    lo, hi = zs.searchsorted(value), zs.searchsorted(value, right=True)
    return lo if index - lo <= hi - index else hi


def adaptive_planes(points: torch.Tensor, camera: Camera, ratio: float, offset=0.0,
                    min_near: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Near and far planes [B] that make about ``ratio * N`` of the ``points`` (voxel centres) active per view.

    Direct selection on the sorted camera-space depths of the points inside each view's side planes: the active
    section is a window of ``round(ratio * N)`` consecutive depths, starting ``offset`` (0 = nearest to the camera,
    1 = farthest; a float or one per view) of the way through the depths not taken; each plane sits midway between
    the last point out and the first point in (ties in depth move it to the nearest gap, the only source of error
    besides the next case). When the side planes hold fewer points than requested, all of them become active (the
    ratio falls short); when they hold none, the view keeps its planes. Planes never come closer than ``min_near``.
    """
    check_range("visibility ratio", ratio, 0, 1, low_open=True)
    pts = points.reshape(-1, 3)
    n_total = len(pts)
    if n_total == 0:
        raise OptionError("adaptive_planes needs at least one point")
    offsets = torch.as_tensor(offset, dtype=torch.float64).reshape(-1).expand(len(camera))
    if ((offsets < 0) | (offsets > 1)).any():
        raise OptionError(f"frustum offset must be in [0, 1]; got {offsets.tolist()}")
    target = min(max(int(round(ratio * n_total)), 1), n_total)
    near, far = camera.near.clone(), camera.far.clone()
    for b in range(len(camera)):
        zs = _side_depths(pts, camera, b, min_near)
        m = len(zs)
        if m == 0:
            continue
        pad = 1e-6 * max(1.0, float(zs[-1]))
        if m <= target:
            start, end = 0, m
        else:
            first = int(round(float(offsets[b]) * (m - target)))
            start, end = _boundary(zs, first), _boundary(zs, first + target)
            if end <= start:  # the whole window lies in one tie group: take the group
                value = zs[min(first, m - 1)]
                start, end = zs.searchsorted(value), zs.searchsorted(value, right=True)
        near[b] = (zs[start - 1] + zs[start]) / 2 if start > 0 else max(float(zs[0]) - pad, min_near)
        far[b] = (zs[end - 1] + zs[end]) / 2 if end < m else float(zs[-1]) + pad
    return near, far


def section(points: torch.Tensor, camera: Camera, ratio: float, offset=0.0,
            min_near: float = 1e-3, margin: float = 0.0) -> tuple[Camera, torch.Tensor]:
    """Cameras with adaptive planes (see :func:`adaptive_planes`) and their active points ``[B, N]``.

    Extract and render only ``points[mask[b]]``'s voxels for view b, and render the ground truth with the returned
    cameras too. ``margin`` also activates the points up to that far outside the near and far planes (the returned
    cameras keep the tight planes): a voxel whose centre lies just outside a plane can hold surface inside it.
    """
    near, far = adaptive_planes(points, camera, ratio, offset, min_near)
    sectioned = camera.with_planes(near, far)
    selecting = camera.with_planes((near - margin).clamp(min=1e-4), far + margin) if margin else sectioned
    return sectioned, frustum_mask(points, selecting)

"""Camera sampling for fitting: outside views, zoomed-in views at surface points, interior views."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..render.camera import Camera, interior_views, random_views, zoom_views


@dataclass
class ViewMix:
    """Probabilities of each kind of view per step (normalised)."""
    outside: float = 0.45
    zoom: float = 0.4
    interior: float = 0.15


class ViewSampler:
    """Draws one camera per call from a :class:`ViewMix`, aimed using the ground-truth surface samples."""

    def __init__(self, points: torch.Tensor, normals: torch.Tensor, size: int, mix: ViewMix | None = None,
                 generator: torch.Generator | None = None, zoom_fov: float = 12.0, resolution: int = 1024):
        self.points, self.normals, self.size = points, normals, size
        self.mix = mix or ViewMix()
        self.generator = generator or torch.Generator().manual_seed(0)
        self.zoom_fov = zoom_fov
        self.resolution = resolution
        weights = torch.tensor([self.mix.outside, self.mix.zoom, self.mix.interior], dtype=torch.float64)
        self.probs = weights / weights.sum()

    def kind(self) -> str:
        k = int(torch.multinomial(self.probs, 1, generator=self.generator))
        return ("outside", "zoom", "interior")[k]

    def sample(self, kind: str | None = None) -> tuple[str, Camera]:
        kind = kind or self.kind()
        g = self.generator
        if kind == "outside":
            cam = random_views(1, g, size=self.size)
        elif kind == "zoom":
            # a zoomed view spans about 25-50 voxels whatever the resolution (and never less than at 1024)
            far = max(1.0, 1024 / self.resolution)
            cam = zoom_views(self.points, 1, g, normals=self.normals, fov=self.zoom_fov, size=self.size,
                             distance=(0.25 * far, 0.5 * far))
        else:
            cam = interior_views(self.points, 1, g, normals=self.normals, size=self.size)
        return kind, cam.to(self.points.device)

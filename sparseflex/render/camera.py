"""Pinhole cameras in the OpenCV convention, and the camera sets used to supervise a shape.

Camera space: x right, y down, z forward; depth is camera-space z. Pixel (row i, column j) has its centre at image
coordinates (u, v) = (j, i), as in OpenCV, so a centred principal point is ((W - 1) / 2, (H - 1) / 2). A point X in
world space maps to camera space as ``R X + t`` (``extrinsics = [[R, t], [0, 1]]``, world to camera) and to the image
as ``K (R X + t)`` divided by its z. A surface point is seen only when its camera z lies in ``[near, far]``.

Camera sets work in the normalised frame of a SparseFlex (shape inside [-0.5, 0.5]^3, world up = +y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import OptionError

#: Radius of the sphere around the normalised cube [-0.5, 0.5]^3.
CUBE_RADIUS = math.sqrt(3) / 2


@dataclass(eq=False)
class Camera:
    """A batch of B pinhole cameras sharing one image size.

    ``K`` [B, 3, 3] OpenCV intrinsics, ``extrinsics`` [B, 4, 4] world-to-camera, ``near``/``far`` [B] clip planes
    (camera-space z). Scalars and unbatched matrices are broadcast to the batch.
    """
    K: torch.Tensor
    extrinsics: torch.Tensor
    width: int
    height: int
    near: torch.Tensor
    far: torch.Tensor

    def __post_init__(self):
        K, E = torch.as_tensor(self.K), torch.as_tensor(self.extrinsics)
        if not K.is_floating_point():
            K = K.double()
        K = K[None] if K.dim() == 2 else K
        E = (E[None] if E.dim() == 2 else E).to(K)
        if K.dim() != 3 or K.shape[1:] != (3, 3) or E.dim() != 3 or E.shape[1:] != (4, 4):
            raise OptionError(f"camera needs K [B, 3, 3] and extrinsics [B, 4, 4]; got {tuple(K.shape)} and "
                              f"{tuple(E.shape)}")
        b = max(len(K), len(E))
        if len(K) not in (1, b) or len(E) not in (1, b):
            raise OptionError(f"camera batch sizes differ: {len(K)} intrinsics, {len(E)} extrinsics")
        K, E = K.expand(b, 3, 3).contiguous(), E.expand(b, 4, 4).contiguous()
        near = torch.as_tensor(self.near, dtype=K.dtype, device=K.device).reshape(-1).expand(b).contiguous()
        far = torch.as_tensor(self.far, dtype=K.dtype, device=K.device).reshape(-1).expand(b).contiguous()
        self.K, self.extrinsics, self.near, self.far = K, E, near, far
        self.width, self.height = int(self.width), int(self.height)
        self._validate()

    def _validate(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise OptionError(f"image size must be positive; got {self.width}x{self.height}")
        K, E = self.K, self.extrinsics
        if not (torch.isfinite(K).all() and torch.isfinite(E).all()):
            raise OptionError("camera matrices contain NaN or infinite values")
        if not (torch.isfinite(self.near).all() and torch.isfinite(self.far).all()):
            raise OptionError("camera near/far planes must be finite")
        fx, fy = K[:, 0, 0], K[:, 1, 1]
        last_row = K.new_tensor([0.0, 0.0, 1.0]).expand(len(K), 3)
        if (fx <= 0).any() or (fy <= 0).any() or (K[:, 1, 0] != 0).any() or not torch.allclose(K[:, 2], last_row):
            raise OptionError("degenerate intrinsics: K must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0")
        R = E[:, :3, :3]
        eye = torch.eye(3, dtype=R.dtype, device=R.device)
        if not torch.allclose(R @ R.transpose(1, 2), eye.expand_as(R), atol=1e-4) or (torch.linalg.det(R) <= 0).any():
            raise OptionError("degenerate extrinsics: the rotation block must be orthonormal with determinant +1")
        if not torch.allclose(E[:, 3], E.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(len(E), 4)):
            raise OptionError("degenerate extrinsics: the last row must be [0, 0, 0, 1]")
        if (self.near <= 0).any():
            raise OptionError(f"near planes must be positive; got min {self.near.min().item():.4g}")
        if (self.near >= self.far).any():
            i = int((self.near >= self.far).nonzero()[0])
            raise OptionError(f"near must be smaller than far; view {i} has near {self.near[i].item():.4g} "
                              f">= far {self.far[i].item():.4g}")

    # -- basic properties ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.K)

    def __getitem__(self, index) -> "Camera":
        """The views selected by ``index`` (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return replace(self, K=self.K[index], extrinsics=self.extrinsics[index], near=self.near[index],
                       far=self.far[index])

    @property
    def device(self) -> torch.device:
        return self.K.device

    @property
    def dtype(self) -> torch.dtype:
        return self.K.dtype

    @property
    def rotation(self) -> torch.Tensor:
        return self.extrinsics[:, :3, :3]

    @property
    def translation(self) -> torch.Tensor:
        return self.extrinsics[:, :3, 3]

    def to(self, device=None, dtype=None) -> "Camera":
        return replace(self, K=self.K.to(device, dtype), extrinsics=self.extrinsics.to(device, dtype),
                       near=self.near.to(device, dtype), far=self.far.to(device, dtype))

    def with_planes(self, near, far) -> "Camera":
        """The same views with other near/far planes (scalars or [B])."""
        return replace(self, near=near, far=far)

    def centers(self) -> torch.Tensor:
        """Camera centres in world space, [B, 3]."""
        return -(self.rotation.transpose(1, 2) @ self.translation[..., None])[..., 0]

    # -- transforms -----------------------------------------------------------------------------------------------
    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """``[N, 3]`` (or ``[B, N, 3]``) world points to ``[B, N, 3]`` camera space."""
        R, t = self.rotation.to(points), self.translation.to(points)
        pts = points if points.dim() == 3 else points[None]
        return pts @ R.transpose(1, 2) + t[:, None]

    def to_pixels(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, 3]`` world points to pixel coordinates ``[B, N, 2]`` (pixel centres at integers) and camera depth
        ``z [B, N]``; points with ``z <= 0`` (behind the camera) get meaningless pixel coordinates."""
        cam = self.world_to_camera(points)
        z = cam[..., 2]
        uvw = cam @ self.K.to(cam).transpose(1, 2)
        return uvw[..., :2] / z.clamp(min=1e-12)[..., None], z

    def projection(self) -> torch.Tensor:
        """OpenGL-style clip matrices [B, 4, 4] for these intrinsics and planes, acting on camera-space points.

        clip_x / clip_w and clip_y / clip_w run from -1 at the left/top image border to +1 at the right/bottom one
        (y keeps the OpenCV downward direction), clip_z / clip_w from -1 at ``near`` to +1 at ``far``, clip_w = z;
        so a camera-space point is inside the view volume iff ``-w <= x, y, z <= w``.
        """
        K, n, f = self.K, self.near, self.far
        P = K.new_zeros(len(self), 4, 4)
        P[:, 0, 0] = 2 * K[:, 0, 0] / self.width
        P[:, 0, 1] = 2 * K[:, 0, 1] / self.width
        P[:, 0, 2] = (2 * K[:, 0, 2] + 1) / self.width - 1
        P[:, 1, 1] = 2 * K[:, 1, 1] / self.height
        P[:, 1, 2] = (2 * K[:, 1, 2] + 1) / self.height - 1
        P[:, 2, 2] = (f + n) / (f - n)
        P[:, 2, 3] = -2 * f * n / (f - n)
        P[:, 3, 2] = 1
        return P

    def mvp(self) -> torch.Tensor:
        """``projection() @ extrinsics``: world space to clip space, [B, 4, 4]."""
        return self.projection() @ self.extrinsics

    def pixel_directions(self, dtype=None) -> torch.Tensor:
        """Camera-space ray directions through the pixel centres, scaled to z = 1: [B, H, W, 3]."""
        dtype = dtype or self.dtype
        v, u = torch.meshgrid(torch.arange(self.height, dtype=dtype, device=self.device),
                              torch.arange(self.width, dtype=dtype, device=self.device), indexing="ij")
        uv1 = torch.stack([u, v, torch.ones_like(u)], dim=-1)
        return torch.einsum("bij,hwj->bhwi", torch.linalg.inv(self.K.to(dtype)), uv1)


def cat_cameras(cameras: list[Camera]) -> Camera:
    """One batch from several camera batches of the same image size."""
    sizes = {(c.width, c.height) for c in cameras}
    if len(sizes) != 1:
        raise OptionError(f"cameras to concatenate must share one image size; got {sorted(sizes)}")
    first = cameras[0]
    cat = lambda name: torch.cat([getattr(c, name).to(first.K) for c in cameras])  # noqa: E731
    return Camera(cat("K"), cat("extrinsics"), first.width, first.height, cat("near"), cat("far"))


# -- building blocks ------------------------------------------------------------------------------------------------
def intrinsics(fov: float, width: int, height: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """K [3, 3] with square pixels, centred principal point and field of view ``fov`` (degrees) across the
    shorter image side."""
    if not 0 < fov < 180:
        raise OptionError(f"field of view must be in (0, 180) degrees; got {fov}")
    if width <= 0 or height <= 0:
        raise OptionError(f"image size must be positive; got {width}x{height}")
    focal = 0.5 * min(width, height) / math.tan(math.radians(fov) / 2)
    return torch.tensor([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]],
                        dtype=dtype, device=device)


def look_at(eyes: torch.Tensor, targets: torch.Tensor, up=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """World-to-camera extrinsics [B, 4, 4] of cameras at ``eyes`` looking at ``targets``, image up along ``up``
    (another axis is used where the view direction is parallel to ``up``)."""
    eyes, targets = torch.broadcast_tensors(eyes, targets.to(eyes))
    z = targets - eyes
    if (z.norm(dim=-1) == 0).any():
        raise OptionError("look_at: a camera sits exactly on its target")
    z = z / z.norm(dim=-1, keepdim=True)
    up_t = eyes.new_tensor(up).expand_as(z)
    alt = eyes.new_tensor([0.0, 0.0, 1.0] if abs(up[2]) < 0.9 else [1.0, 0.0, 0.0]).expand_as(z)
    up_t = torch.where(((z * up_t).sum(-1).abs() > 0.999)[:, None], alt, up_t)
    y = -(up_t - (up_t * z).sum(-1, keepdim=True) * z)  # image y points down, away from "up"
    y = y / y.norm(dim=-1, keepdim=True)
    x = torch.cross(y, z, dim=-1)
    E = eyes.new_zeros(len(eyes), 4, 4)
    E[:, :3, :3] = torch.stack([x, y, z], dim=1)
    E[:, :3, 3] = -(E[:, :3, :3] @ eyes[..., None])[..., 0]
    E[:, 3, 3] = 1
    return E


def fibonacci_sphere(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``n`` unit vectors spread evenly over the sphere (golden-angle spiral), [n, 3]."""
    i = torch.arange(n, dtype=torch.float64)
    y = 1 - 2 * (i + 0.5) / n
    r = torch.sqrt((1 - y * y).clamp(min=0))
    phi = i * math.pi * (3 - math.sqrt(5))
    return torch.stack([r * torch.cos(phi), y, r * torch.sin(phi)], dim=1).to(device=device, dtype=dtype)


def _random_unit(n: int, generator, dtype, device) -> torch.Tensor:
    d = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return (d / d.norm(dim=1, keepdim=True).clamp(min=1e-12)).to(device=device, dtype=dtype)


def _uniform(n: int, low: float, high: float, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _check_count(n: int) -> None:
    if n <= 0:
        raise OptionError(f"number of views must be positive; got {n}")


def _build(eyes, targets, fov, size, near, far, dtype, device) -> Camera:
    w, h = (size, size) if isinstance(size, int) else size
    eyes, targets = eyes.to(device=device, dtype=dtype), targets.to(device=device, dtype=dtype)
    fov = torch.as_tensor(fov, dtype=torch.float64).reshape(-1).expand(len(eyes))
    K = torch.stack([intrinsics(float(a), w, h, dtype, device) for a in fov])
    return Camera(K, look_at(eyes, targets), w, h, near, far)


# -- camera sets in the normalised frame -----------------------------------------------------------------------------
def sphere_views(n: int, radius: float = 2.0, fov: float = 40.0, size=512, near=None, far=None,
                 dtype=torch.float32, device=None) -> Camera:
    """``n`` cameras spread evenly on a sphere of ``radius`` (Fibonacci spiral), looking at the origin.

    Default planes enclose the whole normalised cube: ``radius -+ sqrt(3)/2``.
    """
    _check_count(n)
    if radius <= 0:
        raise OptionError(f"camera radius must be positive; got {radius}")
    eyes = fibonacci_sphere(n, torch.float64) * radius
    near = max(radius - CUBE_RADIUS, 1e-3 * radius) if near is None else near
    far = radius + CUBE_RADIUS if far is None else far
    return _build(eyes, torch.zeros_like(eyes), fov, size, near, far, dtype, device)


def random_views(n: int, generator: torch.Generator | None = None, radius=(1.6, 2.4), fov=(30.0, 50.0),
                 jitter: float = 0.1, size=512, dtype=torch.float32, device=None) -> Camera:
    """``n`` cameras in uniformly random directions at a random distance in ``radius``, with a random field of view
    in ``fov``, aimed at a random point within ``jitter`` of the origin."""
    _check_count(n)
    eyes = _random_unit(n, generator, torch.float64, None) * _uniform(n, *radius, generator)[:, None]
    targets = (torch.rand(n, 3, generator=generator, dtype=torch.float64) * 2 - 1) * jitter
    dist = (eyes - targets).norm(dim=1)
    near = (dist - CUBE_RADIUS - jitter).clamp(min=1e-3 * dist)
    return _build(eyes, targets, _uniform(n, *fov, generator), size, near, dist + CUBE_RADIUS + jitter, dtype, device)


def zoom_views(surface_points: torch.Tensor, n: int, generator: torch.Generator | None = None,
               normals: torch.Tensor | None = None, fov: float = 12.0, distance=(0.25, 0.5), size=512,
               dtype=torch.float32, device=None) -> Camera:
    """``n`` close cameras with a narrow field of view, each aimed at a random surface point.

    With ``normals`` the camera stays on the outer side of the point's surface (within 60 degrees of the normal),
    otherwise its direction is uniformly random.
    """
    _check_count(n)
    pts = torch.as_tensor(surface_points).reshape(-1, 3)
    if len(pts) == 0:
        raise OptionError("zoom_views needs at least one surface point")
    idx = torch.randint(len(pts), (n,), generator=generator)
    targets = pts[idx].double().cpu()
    d = _random_unit(n, generator, torch.float64, None)
    if normals is not None:
        nrm = torch.as_tensor(normals).reshape(-1, 3)[idx].double().cpu()
        nrm = nrm / nrm.norm(dim=1, keepdim=True).clamp(min=1e-12)
        d = torch.where(((d * nrm).sum(1, keepdim=True) < 0), -d, d)  # outer hemisphere
        d = nrm + d * (math.sqrt(3) / 2)  # tilt at most 60 degrees away from the normal
        d = d / d.norm(dim=1, keepdim=True)
    dist = _uniform(n, *distance, generator)
    eyes = targets + d * dist[:, None]
    return _build(eyes, targets, fov, size, 0.02 * dist, dist + 2 * CUBE_RADIUS, dtype, device)


def interior_views(points: torch.Tensor, n: int, generator: torch.Generator | None = None,
                   normals: torch.Tensor | None = None, offset: float = 0.02, fov: float = 70.0, size=512,
                   near: float = 1e-3, dtype=torch.float32, device=None) -> Camera:
    """``n`` cameras placed inside the shape, looking in uniformly random directions.

    With ``normals``, each camera sits ``offset`` behind a random surface point (along the negative normal, i.e.
    inside the volume); without, the ``points`` themselves are used (e.g. voxel centres deep inside). The small
    near plane lets them see the surrounding (interior) surfaces that no outside view reaches.
    """
    _check_count(n)
    pts = torch.as_tensor(points).reshape(-1, 3)
    if len(pts) == 0:
        raise OptionError("interior_views needs at least one point")
    idx = torch.randint(len(pts), (n,), generator=generator)
    eyes = pts[idx].double().cpu()
    if normals is not None:
        nrm = torch.as_tensor(normals).reshape(-1, 3)[idx].double().cpu()
        eyes = eyes - offset * nrm / nrm.norm(dim=1, keepdim=True).clamp(min=1e-12)
    targets = eyes + _random_unit(n, generator, torch.float64, None)
    return _build(eyes, targets, fov, size, near, 2 * CUBE_RADIUS + offset, dtype, device)

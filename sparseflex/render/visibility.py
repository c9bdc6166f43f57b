"""Visibility: which triangle each pixel sees, with near/far clipping. Not differentiable (ids only).

Two interchangeable backends:

- ``torch``: runs unchanged on any device with bounded memory. Each triangle's candidate pixels are the pixel
  centres inside the screen bounding box of its part in front of the near plane; for each (triangle, pixel) pair the
  ray through the pixel centre is intersected with the triangle using edge functions of the ray direction
  (``e_i = d . (v_j x v_k)`` in camera space, linear in the pixel coordinates). That test stays correct for triangles
  crossing the near plane or reaching behind the camera, and the hit's camera z is tested against [near, far]. The
  z-test keeps the smallest (depth, triangle id) per pixel. Pairs are processed in chunks of ``chunk`` elements.
- ``embree``: one ray per pixel centre through Intel Embree (the library shipped with the ``embreex`` wheel, called
  through ctypes with zero-copy buffers; the ``embreex`` Python API is the fallback). Each ray starts on the near
  plane and ends on the far plane, so the same clipping applies.

``backend="auto"`` uses Embree for CPU tensors when it is available and the torch path otherwise.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

import numpy as np
import torch

from ..errors import InputError, OptionError
from .camera import Camera

BACKENDS = ("auto", "torch", "embree")
_NO_HIT_KEY = torch.iinfo(torch.int64).max


def check_mesh(vertices: torch.Tensor, faces: torch.Tensor, allow_empty: bool = False) -> None:
    """Raise :class:`InputError` for a mesh the renderer cannot use."""
    if vertices.dim() != 2 or vertices.shape[-1] != 3:
        raise InputError(f"vertices must be [V, 3]; got {tuple(vertices.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise InputError(f"faces must be [F, 3]; got {tuple(faces.shape)}")
    if not vertices.is_floating_point():
        raise InputError(f"vertices must be floating point; got {vertices.dtype}")
    if faces.is_floating_point():
        raise InputError(f"faces must be integer indices; got {faces.dtype}")
    if len(faces) == 0 and not allow_empty:
        raise InputError("mesh is empty: it has no faces to render")
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise InputError(f"face indices must lie in [0, {len(vertices)}); "
                         f"got [{faces.min().item()}, {faces.max().item()}]")
    if not torch.isfinite(vertices).all():
        raise InputError("vertices contain NaN or infinite values")


def embree_available() -> bool:
    """True when the Embree backend can run."""
    return _embree_library() is not None or _embreex_api() is not None


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera, backend: str = "auto",
              chunk: int = 1 << 21, allow_empty: bool = False) -> torch.Tensor:
    """Triangle id seen through each pixel centre, ``[B, H, W]`` int64, -1 where no surface lies in [near, far].

    ``vertices`` [V, 3] are world-space positions, ``faces`` [F, 3] indices; ``chunk`` bounds the number of
    (triangle, pixel) pairs the torch backend holds at once. An empty mesh raises :class:`InputError` unless
    ``allow_empty`` (then every pixel is -1).
    """
    if backend not in BACKENDS:
        raise OptionError(f"unknown visibility backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_mesh(vertices, faces, allow_empty)
    vertices, faces = vertices.detach(), faces.long()
    if backend == "auto":
        backend = "embree" if vertices.device.type == "cpu" and embree_available() else "torch"
    if len(faces) == 0:
        return torch.full((len(camera), camera.height, camera.width), -1, dtype=torch.long, device=vertices.device)
    if backend == "embree":
        if not embree_available():
            raise OptionError("the embree backend needs the embreex package (pip install embreex)")
        return _rasterize_embree(vertices, faces, camera)
    return _rasterize_torch(vertices, faces, camera, chunk)


# -- torch backend ------------------------------------------------------------------------------------------------
def edge_coefficients(tri: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Camera-space edge normals ``c_i = v_j x v_k`` (edge i opposite vertex i, (i, j, k) cyclic), [F, 3, 3].

    Computed as ``v_lo x (v_hi - v_lo)`` with (lo, hi) the edge's vertex indices in increasing order and the sign
    restored afterwards, so the two triangles sharing an edge get exactly opposite values: no pixel centre on a
    shared edge falls through the crack between them.
    """
    j, k = [1, 2, 0], [2, 0, 1]
    a, b = faces[:, j], faces[:, k]                    # [F, 3] vertex ids of each edge
    va, vb = tri[:, j], tri[:, k]                      # [F, 3, 3]
    swap = (a > b)[..., None]
    lo, hi = torch.where(swap, vb, va), torch.where(swap, va, vb)
    c = torch.cross(lo, hi - lo, dim=-1)
    return torch.where(swap, -c, c)


def _screen_bounds(tri: torch.Tensor, K: torch.Tensor, near: float):
    """Screen bounding box (u_min, u_max, v_min, v_max) of each triangle's part with z >= near.

    Triangles crossing the near plane are cut first: their box spans the kept corners and the edge points on the
    plane (the projection of the clipped polygon), so it stays conservative without projecting points behind the
    camera.
    """
    z = tri[..., 2]
    pts, valid = tri, None
    crossing = (z.amin(1) < near).nonzero().squeeze(1)
    if len(crossing):
        j = [1, 2, 0]
        t = tri[crossing]
        tz = t[..., 2]
        cut_edge = (tz - near) * (tz[:, j] - near) < 0
        s = ((near - tz) / torch.where(cut_edge, tz[:, j] - tz, torch.ones_like(tz))).clamp(0, 1)
        cut = t + s[..., None] * (t[:, j] - t)
        # Replace each crossing triangle's corners behind the plane by a cut point; keep the others as they are.
        valid = torch.ones(len(tri), 6, dtype=torch.bool, device=tri.device)
        valid[crossing] = torch.cat([tz >= near, cut_edge], 1)
        pts = torch.cat([tri, tri], 1)
        pts[crossing, 3:] = cut
    zz = pts[..., 2].clamp(min=near)
    u = (K[0, 0] * pts[..., 0] + K[0, 1] * pts[..., 1]) / zz + K[0, 2]
    v = K[1, 1] * pts[..., 1] / zz + K[1, 2]
    if valid is None:
        return u.amin(1), u.amax(1), v.amin(1), v.amax(1)
    inf = torch.full_like(u, float("inf"))
    return (torch.where(valid, u, inf).amin(1), torch.where(valid, u, -inf).amax(1),
            torch.where(valid, v, inf).amin(1), torch.where(valid, v, -inf).amax(1))


def _pixel_range(lo, hi, size: int):
    """First and last integer pixel centre within [lo, hi] (a tiny margin keeps the box conservative)."""
    first = torch.ceil(lo.clamp(-1, size) - 1e-4).long().clamp(min=0)
    last = torch.floor(hi.clamp(-1, size) + 1e-4).long().clamp(max=size - 1)
    return first, last


def _rasterize_torch(vertices, faces, camera: Camera, chunk: int) -> torch.Tensor:
    dtype, device = vertices.dtype, vertices.device
    cam_verts = camera.world_to_camera(vertices)       # [B, V, 3]
    K_all, Kinv_all = camera.K.to(dtype), torch.linalg.inv(camera.K.to(dtype))
    H, W = camera.height, camera.width
    flat_faces = faces.reshape(-1)
    out = []
    for b in range(len(camera)):  # views one at a time: memory follows one image
        n, f = float(camera.near[b]), float(camera.far[b])
        tri = cam_verts[b].index_select(0, flat_faces).view(-1, 3, 3)
        z = tri[..., 2]
        ids = ((z.amax(1) >= n) & (z.amin(1) <= f)).nonzero().squeeze(1)
        tri = tri[ids]
        u0, u1, v0, v1 = _screen_bounds(tri, K_all[b], n)
        c0, c1 = _pixel_range(u0, u1, W)
        r0, r1 = _pixel_range(v0, v1, H)
        width = (c1 - c0 + 1).clamp(min=0)
        count = width * (r1 - r0 + 1).clamp(min=0)
        sel = (count > 0).nonzero().squeeze(1)
        ids, tri = ids[sel], tri[sel]
        # Per triangle, in pixel coordinates: edge functions e_i(u, v) = [u, v, 1] . (K^-T c_i), ray-plane
        # denominator S(u, v) = [u, v, 1] . (K^-T N), and D = N . v0, so the hit's camera z is D / S.
        normal = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        Kt = Kinv_all[b].T
        per_tri = torch.cat([(edge_coefficients(tri, faces[ids]) @ Kt.T).reshape(-1, 9), normal @ Kt.T,
                             (normal * tri[:, 0]).sum(-1, keepdim=True)], 1)       # [T, 13]
        count = count[sel]
        ends = torch.cumsum(count, 0)
        boxes = torch.stack([ends - count, width[sel], c0[sel], r0[sel]], 1)     # [T, 4]
        total = int(ends[-1]) if len(ends) else 0
        best = torch.full((H * W,), _NO_HIT_KEY, dtype=torch.long, device=device)
        for start in range(0, total, chunk):
            pair = torch.arange(start, min(start + chunk, total), device=device)
            t = torch.searchsorted(ends, pair, right=True)                        # triangle of each pair
            box = boxes.index_select(0, t)
            local = pair - box[:, 0]
            row = box[:, 3] + torch.div(local, box[:, 1], rounding_mode="floor")
            col = box[:, 2] + local - (row - box[:, 3]) * box[:, 1]
            p = per_tri.index_select(0, t)
            u, v = col.to(dtype)[:, None], row.to(dtype)[:, None]
            e = p[:, 0:9:3] * u + p[:, 1:9:3] * v + p[:, 2:9:3]                    # [P, 3]
            s = p[:, 9] * u[:, 0] + p[:, 10] * v[:, 0] + p[:, 11]
            depth = p[:, 12] / s
            hit = ((e * s[:, None]) >= 0).all(1) & (depth >= n) & (depth <= f)
            hit = hit.nonzero().squeeze(1)
            if len(hit) == 0:
                continue
            key = (depth[hit].float().view(torch.int32).long() << 32) | ids.index_select(0, t[hit])
            best.scatter_reduce_(0, (row * W + col)[hit], key, reduce="amin")
        tri_id = torch.where(best == _NO_HIT_KEY, torch.full_like(best, -1), best & 0xFFFFFFFF)
        out.append(tri_id.view(H, W))
    return torch.stack(out)


# -- embree backend -----------------------------------------------------------------------------------------------
_LIB_LOCK = threading.Lock()
_LIB_STATE: dict = {}


def _embree_library():
    """The Embree 4 shared library bundled with embreex, with ctypes signatures, or None."""
    with _LIB_LOCK:
        if "lib" in _LIB_STATE:
            return _LIB_STATE["lib"]
        _LIB_STATE["lib"] = None
        try:
            import embreex
        except ImportError:
            return None
        root = os.path.dirname(os.path.dirname(os.path.abspath(embreex.__file__)))
        candidates = []
        for pattern in ("embreex.libs/libembree4*", "embreex/.dylibs/libembree4*", "embreex.libs/embree4*.dll",
                        "embreex/libembree4*", "embreex/embree4*.dll"):
            candidates += sorted(glob.glob(os.path.join(root, pattern)))
        for path in candidates:
            try:
                lib = ctypes.CDLL(path)
                vp, ci, cu, cs = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
                sig = {"rtcNewDevice": (vp, [ctypes.c_char_p]), "rtcNewScene": (vp, [vp]),
                       "rtcNewGeometry": (vp, [vp, ci]),
                       "rtcSetSharedGeometryBuffer": (None, [vp, ci, cu, ci, vp, cs, cs, cs]),
                       "rtcCommitGeometry": (None, [vp]), "rtcAttachGeometry": (cu, [vp, vp]),
                       "rtcReleaseGeometry": (None, [vp]), "rtcCommitScene": (None, [vp]),
                       "rtcReleaseScene": (None, [vp]), "rtcIntersect16": (None, [vp, vp, vp, vp]),
                       "rtcGetDeviceError": (ci, [vp])}
                for name, (res, args) in sig.items():
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = res, args
                device = lib.rtcNewDevice(None)
                if not device:
                    continue
                _LIB_STATE["lib"], _LIB_STATE["device"] = lib, device
                break
            except (OSError, AttributeError):
                continue
        return _LIB_STATE["lib"]


def _embreex_api():
    try:
        from embreex import mesh_construction, rtcore_scene
    except ImportError:
        return None
    return rtcore_scene, mesh_construction


# Embree 4 RTCRayHit16 (structure of arrays, 16 lanes): ray org_x..z, tnear, dir_x..z, time, tfar, mask, id, flags;
# hit Ng_x..z, u, v, primID, geomID, instID (+ instPrimID in some builds). Sizes in 4-byte words.
_LANES = 16
_RAY_FIELDS = {"org": 0, "tnear": 3, "dir": 4, "tfar": 8, "mask": 9}
_PRIM_ID = 12 + 5
_PACKET_WORDS = 24 * _LANES  # 22 fields used, padded; 1536 bytes keeps every packet 64-byte aligned


def cast_rays(vertices: np.ndarray, faces: np.ndarray, origins: np.ndarray, directions: np.ndarray,
              tfar: np.ndarray) -> np.ndarray:
    """Raw Embree ray casting: first hit along ``origins + t * directions``, t in [0, tfar]; primitive id or -1.

    Arrays are float32 (int for faces) numpy; the scene is built once per call (BVH over all faces).
    """
    lib = _embree_library()
    if lib is None:
        return _cast_rays_embreex(vertices, faces, origins, directions, tfar)
    V = np.zeros((len(vertices) + 1, 4), np.float32)  # float4 stride and one padding vertex, as Embree reads 16 B
    V[:-1, :3] = vertices
    F = np.ascontiguousarray(faces, dtype=np.uint32)
    scene = lib.rtcNewScene(_LIB_STATE["device"])
    try:
        geom = lib.rtcNewGeometry(_LIB_STATE["device"], 0)                 # RTC_GEOMETRY_TYPE_TRIANGLE
        lib.rtcSetSharedGeometryBuffer(geom, 1, 0, 0x9003, V.ctypes.data, 0, 16, len(vertices))  # VERTEX FLOAT3
        lib.rtcSetSharedGeometryBuffer(geom, 0, 0, 0x5003, F.ctypes.data, 0, 12, len(F))          # INDEX UINT3
        lib.rtcCommitGeometry(geom)
        lib.rtcAttachGeometry(scene, geom)
        lib.rtcReleaseGeometry(geom)
        lib.rtcCommitScene(scene)
        if lib.rtcGetDeviceError(_LIB_STATE["device"]) != 0:  # unexpected library: use the embreex API instead
            return _cast_rays_embreex(vertices, faces, origins, directions, tfar)
        n = len(origins)
        packets = -(-n // _LANES)
        pad = packets * _LANES - n
        raw = np.empty(packets * _PACKET_WORDS + 16, np.float32)
        shift = (-raw.ctypes.data % 64) // 4                                 # 64-byte alignment
        buf = raw[shift:shift + packets * _PACKET_WORDS].reshape(packets, -1, _LANES)
        def lanes(a):  # [n, k] -> [packets, k, 16], zero-padded
            a = np.concatenate([a.astype(np.float32), np.zeros((pad, a.shape[1]), np.float32)])
            return a.reshape(packets, _LANES, -1).transpose(0, 2, 1)

        buf[:, 0:3] = lanes(origins)
        buf[:, 3] = 0.0
        buf[:, 4:7] = lanes(directions)
        buf[:, 7] = 0.0
        buf[:, 8] = lanes(tfar[:, None])[:, 0]
        ints = buf.view(np.uint32)
        ints[:, 9] = 0xFFFFFFFF                  # mask
        ints[:, 10:12] = 0
        ints[:, 12 + 5:12 + 8] = 0xFFFFFFFF      # primID, geomID, instID invalid
        valid = np.full(_LANES, -1, np.int32)
        base, stride = buf.ctypes.data, _PACKET_WORDS * 4
        intersect, vptr = lib.rtcIntersect16, valid.ctypes.data
        for i in range(packets):  # one call per 16 rays: the loop costs about as much as the tracing
            intersect(vptr, scene, base + i * stride, None)
        return buf[:, _PRIM_ID].view(np.int32).reshape(-1)[:n].astype(np.int64)
    finally:
        lib.rtcReleaseScene(scene)


def _cast_rays_embreex(vertices, faces, origins, directions, tfar):
    rtcore_scene, mesh_construction = _embreex_api()
    scene = rtcore_scene.EmbreeScene()
    mesh_construction.TriangleMesh(scene, np.ascontiguousarray(vertices, np.float32),
                                   np.ascontiguousarray(faces, np.int32))
    ids = scene.run(np.ascontiguousarray(origins, np.float32), np.ascontiguousarray(directions, np.float32),
                    dists=np.ascontiguousarray(tfar, np.float32))
    return ids.astype(np.int64)


def camera_rays(camera: Camera):
    """World-space rays of every pixel centre for the embree backend: origins on the near plane, directions scaled
    so that t measures camera z from the near plane, and t_far = far - near. Numpy float32, [B * H * W, ...]."""
    d_cam = camera.pixel_directions(torch.float32).view(len(camera), -1, 3)          # z = 1
    d_world = torch.bmm(d_cam, camera.rotation.float())                               # R^T d, row-wise
    near = camera.near.float()[:, None, None]
    origins = camera.centers().float()[:, None] + near * d_world
    tfar = (camera.far - camera.near).float()[:, None].expand(d_cam.shape[:2])
    return (origins.reshape(-1, 3).cpu().numpy(), d_world.reshape(-1, 3).cpu().numpy(),
            tfar.reshape(-1).contiguous().cpu().numpy())


def _rasterize_embree(vertices, faces, camera: Camera) -> torch.Tensor:
    origins, directions, tfar = camera_rays(camera)
    ids = cast_rays(vertices.cpu().numpy(), faces.cpu().numpy(), origins, directions, tfar)
    return torch.from_numpy(ids).view(len(camera), camera.height, camera.width).to(vertices.device)

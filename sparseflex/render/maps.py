"""Differentiable maps from visibility: barycentrics, interpolation, mask/depth/normal, silhouette anti-aliasing.

Everything here takes the triangle ids of :func:`~sparseflex.render.visibility.rasterize` as fixed and recomputes the
ray-triangle intersection in torch from the vertex tensor, so gradients reach vertex positions. Only pixels that see
a surface are evaluated (a compact list), then scattered into dense ``[B, H, W, ...]`` maps; background is 0.

Normals are face normals in camera space, turned to face the camera, so both sides of an open surface render alike
(and a closed surface seen from inside shows its inner side facing the viewer).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .camera import Camera
from .visibility import rasterize


@dataclass
class Topology:
    """Edge adjacency of a triangle mesh. Edge k of a face joins its vertices k+1 and k+2 (mod 3)."""
    neighbor: torch.Tensor  # [F, 3] face across each edge; -1 on a boundary edge, -2 on a non-manifold edge
    flipped: torch.Tensor   # [F, 3] True where the neighbour runs the shared edge in the same direction


def mesh_topology(faces: torch.Tensor) -> Topology:
    """Face adjacency across edges, from one sort of int64 edge keys."""
    faces = faces.long()
    a, b = faces[:, [1, 2, 0]].reshape(-1), faces[:, [2, 0, 1]].reshape(-1)  # entry f * 3 + k
    nv = int(faces.max()) + 1 if len(faces) else 1
    sorted_key, order = torch.sort(torch.minimum(a, b) * nv + torch.maximum(a, b))
    same = sorted_key[1:] == sorted_key[:-1]
    false = same.new_zeros(1)
    prev, nxt = torch.cat([false, same]), torch.cat([same, false])   # equal to the previous / next sorted key
    first = nxt & ~prev & ~torch.cat([nxt[1:], false])                # first entry of a run of exactly two
    first = first.nonzero().squeeze(1)
    e0, e1 = order[first], order[first + 1]
    neighbor = torch.full_like(a, -1)
    neighbor[order[prev | nxt]] = -2                                  # shared edges: non-manifold unless a pair
    neighbor[e0], neighbor[e1] = e1 // 3, e0 // 3
    forward = a < b
    flipped = torch.zeros_like(forward)
    flipped[e0] = flipped[e1] = forward[e0] == forward[e1]
    return Topology(neighbor.view(-1, 3), flipped.view(-1, 3))


_TOPOLOGY_CACHE: dict[int, tuple] = {}


def cached_topology(faces: torch.Tensor) -> Topology:
    """:func:`mesh_topology`, remembered while this very ``faces`` tensor lives unmodified (e.g. a ground-truth mesh
    rendered every step); a new tensor, even with equal contents, is computed afresh."""
    key = id(faces)
    entry = _TOPOLOGY_CACHE.get(key)
    if entry is not None and entry[0]() is faces and entry[1] == faces._version:
        return entry[2]
    topology = mesh_topology(faces)
    if len(_TOPOLOGY_CACHE) < 16:
        ref = weakref.ref(faces, lambda _, key=key: _TOPOLOGY_CACHE.pop(key, None))
        _TOPOLOGY_CACHE[key] = (ref, faces._version, topology)
    return topology


# -- per-pixel ray geometry ---------------------------------------------------------------------------------------
def _pixel_rays(camera: Camera, flat: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """View index and camera-space direction (z = 1) of flat pixel indices into [B, H, W]."""
    hw = camera.height * camera.width
    view, rest = torch.div(flat, hw, rounding_mode="floor"), flat % hw
    row, col = torch.div(rest, camera.width, rounding_mode="floor"), rest % camera.width
    uv1 = torch.stack([col.to(dtype), row.to(dtype), torch.ones_like(col, dtype=dtype)], -1)
    k_inv = torch.linalg.inv(camera.K.to(dtype))
    return view, torch.einsum("mij,mj->mi", k_inv[view], uv1)


def _triangles(cam_verts: torch.Tensor, faces: torch.Tensor, view: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Camera-space corners [M, 3, 3] of triangle ``tri`` in view ``view`` (``cam_verts`` [B, V, 3])."""
    rows = faces.index_select(0, tri) + (view * cam_verts.shape[1])[:, None]
    return cam_verts.reshape(-1, 3).index_select(0, rows.reshape(-1)).view(-1, 3, 3)


def _plane(tri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Face normal N = (v1 - v0) x (v2 - v0) and D = N . v0; a ray t * d meets the plane at camera z = D / (N . d)."""
    n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    return n, (n * tri[:, 0]).sum(-1)


def _edge_normals(tri: torch.Tensor) -> torch.Tensor:
    """c_k = v_j x v_k for edge k (opposite vertex k), written relative to v_j for precision; [M, 3, 3]."""
    vj, vk = tri[:, [1, 2, 0]], tri[:, [2, 0, 1]]
    return torch.cross(vj, vk - vj, dim=-1)


def _scatter(values: torch.Tensor, flat: torch.Tensor, shape) -> torch.Tensor:
    """Dense map of ``shape`` (+ trailing value dims), zero except at ``flat``."""
    total = 1
    for s in shape:
        total *= s
    dense = values.new_zeros((total,) + values.shape[1:])
    return dense.index_put((flat,), values).view(*shape, *values.shape[1:])


def visible(tri_id: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``[B, H, W]`` of the pixels that see a surface."""
    return (tri_id.reshape(-1) >= 0).nonzero().squeeze(1)


# -- primitives -----------------------------------------------------------------------------------------------------
def barycentrics(vertices: torch.Tensor, faces: torch.Tensor, tri_id: torch.Tensor, camera: Camera) -> torch.Tensor:
    """Perspective-correct barycentrics of each pixel ray's hit on its triangle, ``[B, H, W, 3]`` (0 where empty)."""
    flat = visible(tri_id)
    view, d = _pixel_rays(camera, flat, vertices.dtype)
    tri = _triangles(camera.world_to_camera(vertices), faces.long(), view, tri_id.reshape(-1)[flat])
    e = (_edge_normals(tri) * d[:, None]).sum(-1)  # e_k = d . c_k, proportional to barycentric k
    return _scatter(e / e.sum(-1, keepdim=True), flat, tri_id.shape)


def interpolate(attributes: torch.Tensor, faces: torch.Tensor, tri_id: torch.Tensor,
                bary: torch.Tensor) -> torch.Tensor:
    """Per-vertex ``attributes`` [V, C] (or [B, V, C] per view) interpolated at each pixel, ``[B, H, W, C]``."""
    flat = visible(tri_id)
    rows = faces.long().index_select(0, tri_id.reshape(-1)[flat])              # [M, 3] vertex ids
    if attributes.dim() == 3:                                                   # per view: offset into [B * V]
        view = torch.div(flat, tri_id.shape[1] * tri_id.shape[2], rounding_mode="floor")
        rows = rows + (view * attributes.shape[1])[:, None]
    table = attributes.reshape(-1, attributes.shape[-1])
    vals = table.index_select(0, rows.reshape(-1)).view(len(flat), 3, -1)
    vals = (vals * bary.reshape(-1, 3)[flat][..., None]).sum(1)
    return _scatter(vals, flat, tri_id.shape)


def surface_maps(vertices: torch.Tensor, faces: torch.Tensor, tri_id: torch.Tensor, camera: Camera) -> dict:
    """``mask`` [B, H, W], camera-space ``depth`` [B, H, W] and camera-facing unit ``normal`` [B, H, W, 3], without
    anti-aliasing. Depth and normal are differentiable with respect to ``vertices``."""
    flat = visible(tri_id)
    view, d = _pixel_rays(camera, flat, vertices.dtype)
    tri = _triangles(camera.world_to_camera(vertices), faces.long(), view, tri_id.reshape(-1)[flat])
    n, dn = _plane(tri)
    s = (n * d).sum(-1)
    depth = dn / s
    facing = torch.where(s > 0, -1.0, 1.0).to(n)  # the normal points back along the ray
    normal = n / n.norm(dim=-1, keepdim=True) * facing[:, None]
    mask = (tri_id >= 0).to(vertices.dtype)
    return {"mask": mask, "depth": _scatter(depth, flat, tri_id.shape), "normal": _scatter(normal, flat, tri_id.shape)}


def silhouette_edges(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera, topology: Topology) -> torch.Tensor:
    """``[B, F, 3]`` bool: edge k of face f is a silhouette edge in view b (a boundary or non-manifold edge, or the
    camera sees its two faces from opposite sides)."""
    with torch.no_grad():
        tri = vertices.index_select(0, faces.reshape(-1)).view(-1, 3, 3)
        n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        # Camera-space D = N . v0 equals N . (v0 - C) in world space: its sign says which side the camera is on.
        side = torch.sign((n * tri[:, 0]).sum(-1)[None] - camera.centers().to(n) @ n.T)  # [B, F]
        nb = topology.neighbor
        side_nb = side[:, nb.clamp(min=0).reshape(-1)].view(len(side), -1, 3)
        side_nb = torch.where(topology.flipped[None], -side_nb, side_nb)
        return (nb < 0)[None] | (side_nb != side[..., None])


def _pixel_pairs(tri_id: torch.Tensor, occluder_candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (src, dst) indices of neighbouring pixels (horizontal and vertical) seeing different triangles, where
    ``occluder_candidate`` [B, H, W] holds at src."""
    b, h, w = tri_id.shape
    every = slice(None)
    horizontal = (every, every, slice(0, -1)), (every, every, slice(1, None))
    vertical = (every, slice(0, -1)), (every, slice(1, None))
    src, dst = [], []
    for step, (a_sl, b_sl) in ((1, horizontal), (w, vertical)):
        differ = tri_id[a_sl] != tri_id[b_sl]
        for forward in (True, False):  # the first pixel of the pair as occluder, then the second
            cand = differ & (occluder_candidate[a_sl] if forward else occluder_candidate[b_sl])
            bi, i, j = cand.nonzero().unbind(1)
            first = (bi * h + i) * w + j
            src.append(first if forward else first + step)
            dst.append(first + step if forward else first)
    return torch.cat(src), torch.cat(dst)


def antialias(image: torch.Tensor, tri_id: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor, camera: Camera,
              topology: Topology | None = None) -> torch.Tensor:
    """Blend ``image`` [B, H, W, C] across silhouette edges so coverage is a differentiable function of the edges'
    screen positions (the idea of Laine et al. 2020, "Modular primitives for high-performance differentiable
    rendering").

    For every pair of horizontally or vertically adjacent pixels (p, q) seeing different triangles, the triangle at
    p is tested as an occluder of q: the segment from p's centre to q's leaves the triangle through edge k at
    fraction alpha (from the edge functions, linear along the segment); edge k must be a silhouette edge (see
    :func:`silhouette_edges`) and the triangle's plane must pass in front of what q sees, within [near, far].
    Then the occluder covers alpha - 1/2 of q's cell when alpha > 1/2 (q += (alpha - 1/2)(c_p - c_q)), or the
    background uncovers 1/2 - alpha of p's cell (p += (alpha - 1/2)(c_p - c_q)). Both pixels of a pair are tried
    as the occluder. Gradients reach the vertices through alpha and the colours through c_p, c_q.
    """
    b, h, w, c = image.shape
    topology = topology or cached_topology(faces)
    faces = faces.long()
    sil = silhouette_edges(vertices.detach(), faces, camera, topology)                       # [B, F, 3]
    ids = tri_id.reshape(b, -1)
    has_sil = sil.any(-1).gather(1, ids.clamp(min=0)) & (ids >= 0)
    src, dst = _pixel_pairs(tri_id, has_sil.view(b, h, w))
    if len(src) == 0:
        return image

    dtype = vertices.dtype
    ids = ids.reshape(-1)
    cam_verts = camera.world_to_camera(vertices)
    view, d_src = _pixel_rays(camera, src, dtype)
    _, d_dst = _pixel_rays(camera, dst, dtype)
    occluder = ids[src]
    tri = _triangles(cam_verts, faces, view, occluder)
    n, dn = _plane(tri)
    edge = _edge_normals(tri)
    sign = torch.where((n * d_src).sum(-1) >= 0, 1.0, -1.0).to(dtype)[:, None]
    f_src = (edge * d_src[:, None]).sum(-1) * sign  # >= 0: p is inside every edge
    f_dst = (edge * d_dst[:, None]).sum(-1) * sign
    exits = f_dst < 0
    cross = torch.where(exits, f_src / torch.where(exits, f_src - f_dst, torch.ones_like(f_src)),
                        torch.full_like(f_src, float("inf")))
    k = cross.detach().argmin(1)                    # the segment leaves the triangle through its first crossing
    alpha = cross.gather(1, k[:, None])[:, 0]

    with torch.no_grad():
        silhouette = exits.any(1) & sil[view, occluder, k]
        # Occlusion: the occluder's plane, extended to q's ray, lies in [near, far] and in front of q's surface.
        t_ext = dn / (n * d_dst).sum(-1)
        seen = ids[dst]
        q_n, q_dn = _plane(_triangles(cam_verts, faces, view, seen.clamp(min=0)))
        q_depth = torch.where(seen >= 0, q_dn / (q_n * d_dst).sum(-1), torch.full_like(q_dn, float("inf")))
        front = (t_ext >= camera.near.to(dtype)[view]) & (t_ext <= camera.far.to(dtype)[view]) & (t_ext < q_depth)
        use = (silhouette & front).nonzero().squeeze(1)

    alpha = alpha[use].clamp(0, 1)
    src, dst = src[use], dst[use]
    flat_img = image.reshape(-1, c)
    delta = (alpha - 0.5)[:, None] * (flat_img[src] - flat_img[dst])
    target = torch.where(alpha > 0.5, dst, src)
    return flat_img.index_add(0, target, delta).view(b, h, w, c)


def render(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera, backend: str = "auto",
           antialias_edges: bool = True, topology: Topology | None = None, allow_empty: bool = False) -> dict:
    """Render ``mask`` [B, H, W], ``depth`` [B, H, W], ``normal`` [B, H, W, 3] and ``tri_id`` [B, H, W] of a mesh
    (world-space ``vertices`` [V, 3], ``faces`` [F, 3]) for every view of ``camera``.

    Visibility comes from :func:`rasterize` (``backend``); the maps are differentiable with respect to
    ``vertices``, silhouettes included when ``antialias_edges`` (mask, depth and normal are blended together).
    An empty mesh raises :class:`~sparseflex.errors.InputError` unless ``allow_empty`` (then all maps are 0).
    """
    tri_id = rasterize(vertices.detach(), faces, camera, backend=backend, allow_empty=allow_empty)
    maps = surface_maps(vertices, faces, tri_id, camera)
    if antialias_edges and len(faces):
        stacked = torch.cat([maps["mask"][..., None], maps["depth"][..., None], maps["normal"]], dim=-1)
        stacked = antialias(stacked, tri_id, vertices, faces, camera, topology)
        maps = {"mask": stacked[..., 0], "depth": stacked[..., 1], "normal": stacked[..., 2:]}
    maps["tri_id"] = tri_id
    return maps

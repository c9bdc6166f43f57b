"""Sparse FlexiCubes extraction (dual marching cubes on active voxels only, SPEC section 2).

Nothing of size R^3 is ever allocated: the work is proportional to the number of active voxels. Dense FlexiCubes is
this function called with every voxel of the grid active (see :func:`sparseflex.sparse.dense_grid`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sparse.coords import CORNER_OFFSETS, VoxelHash, batched
from .tables import AMBIGUOUS_FACE, CROSSING_EDGES, EDGE_AXIS, EDGE_CORNERS, EDGE_PATCH, FACE_NORMALS, NUM_PATCHES


def _quad_order_table() -> tuple[torch.Tensor, torch.Tensor]:
    """For each voxel edge: the voxel's slot (0..3) counter-clockwise around the edge's axis, and the edge's low corner.

    Around an edge along axis a, with (a, b, c) a right-handed cyclic frame, the four voxels sharing it sit at
    (b, c) offsets (-,-), (+,-), (+,+), (-,+); joined in that order their quad's normal points along +a.
    """
    slot_of = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    slots, low = [], []
    for e, (c0, c1) in enumerate(EDGE_CORNERS.tolist()):
        a = int(EDGE_AXIS[e])
        b, c = (a + 1) % 3, (a + 2) % 3
        # The edge lies on the voxel's low b-face when its offset is 0, so the voxel is on the + side of it.
        qb = 1 - int(CORNER_OFFSETS[c0, b])
        qc = 1 - int(CORNER_OFFSETS[c0, c])
        slots.append(slot_of[(qb, qc)])
        low.append(c0 if int(CORNER_OFFSETS[c0, a]) == 0 else c1)
    return torch.tensor(slots), torch.tensor(low)


EDGE_SLOT, EDGE_LOW_CORNER = _quad_order_table()


#: Surface voxels per chunk of :func:`extract_surface`: about 0.1 GB of temporaries.
CHUNK_SURFACE_VOXELS = 1 << 17


@dataclass
class Extraction:
    """A triangle mesh extracted from a SparseFlex, with what the regularisers need."""
    vertices: torch.Tensor        # [V, 3]
    faces: torch.Tensor           # [F, 3] int64, counter-clockwise seen from s > 0
    vertex_batch: torch.Tensor    # [V] batch index of each vertex
    dev: torch.Tensor             # [D] L_dev per dual vertex (mean absolute deviation of crossing distances)
    dual_voxel: torch.Tensor      # [D] row of the voxel each dual vertex lies in
    crossing_edges: torch.Tensor  # [E, 2] corner rows of every crossing edge (deduplicated)
    num_dual: int                 # dual vertices before dropping those no quad uses

    @property
    def dev_loss(self) -> torch.Tensor:
        return self.dev.mean() if self.dev.numel() else self.vertices.new_zeros(())


def voxel_cases(corner_sdf: torch.Tensor, voxel_corners: torch.Tensor) -> torch.Tensor:
    """Case id per voxel: sum_i 2^i [s_i < 0]."""
    inside = corner_sdf < 0
    cases = torch.zeros(len(voxel_corners), dtype=torch.long, device=voxel_corners.device)
    for i in range(8):  # one column at a time: no [N, 8] int64 temporary
        cases |= inside[voxel_corners[:, i]].long() << i
    return cases


def resolve_ambiguity(coords: torch.Tensor, cases: torch.Tensor, table: VoxelHash | None = None) -> torch.Tensor:
    """Apply the ambiguity fix: two face-adjacent voxels both in the 36 single-patch ambiguous cases take 255 - c."""
    face = AMBIGUOUS_FACE.to(cases.device)[cases]
    cand = (face >= 0).nonzero().squeeze(1)
    if len(cand) == 0:
        return cases
    coords = batched(coords)
    step = torch.cat([FACE_NORMALS.new_zeros(6, 1), FACE_NORMALS], dim=1).to(coords.device)
    table = table or VoxelHash(coords)
    nb = table.lookup(coords[cand] + step[face[cand]])
    ok = nb >= 0
    ok[ok.clone()] = AMBIGUOUS_FACE.to(cases.device)[cases[nb[ok]]] >= 0
    cases = cases.clone()
    cases[cand[ok]] = 255 - cases[cand[ok]]
    return cases


def _crossings(surf, surf_cases, first_dual, voxel_corners, corner_positions, corner_sdf, alpha, beta, act_alpha,
               act_beta):
    """Steps 2-4 and 8 for some surface voxels: their dual vertices, L_dev, and per (voxel, crossing edge) entry
    the edge's sort key (``(low row * Nc + high row) * 4 + slot``), its dual vertex, whether the edge's first corner
    (SPEC edge order) is inside, and whether its low corner is outside (the quad's orientation)."""
    device, dtype = corner_positions.device, corner_positions.dtype
    edge_corners = EDGE_CORNERS.to(device)
    ent_s, ent_e = CROSSING_EDGES.to(device)[surf_cases].nonzero(as_tuple=True)
    ent_v = surf[ent_s]
    lc0, lc1 = edge_corners[ent_e, 0], edge_corners[ent_e, 1]
    c0, c1 = voxel_corners[ent_v, lc0], voxel_corners[ent_v, lc1]
    s0, s1 = corner_sdf[c0], corner_sdf[c1]
    x0, x1 = corner_positions[c0], corner_positions[c1]
    # 2-3. Alpha-weighted crossing point u inside the voxel.
    s0w, s1w = s0 * act_alpha(alpha[ent_v, lc0]), s1 * act_alpha(alpha[ent_v, lc1])
    u = (x0 * s1w[:, None] - x1 * s0w[:, None]) / (s1w - s0w)[:, None]

    # 4. Dual vertices: beta-weighted mean of the crossings of each patch (numbered from the chunk's first).
    base = int(first_dual[0]) if len(first_dual) else 0
    num_dual = int(first_dual[-1] - base + NUM_PATCHES.to(device)[surf_cases[-1]]) if len(first_dual) else 0
    dual = first_dual[ent_s] - base + EDGE_PATCH.to(device)[surf_cases[ent_s], ent_e]
    w = act_beta(beta[ent_v, ent_e])
    wsum = torch.zeros(num_dual, device=device, dtype=dtype).index_add(0, dual, w)
    dual_pos = torch.zeros(num_dual, 3, device=device, dtype=dtype).index_add(0, dual, w[:, None] * u)
    dual_pos = dual_pos / wsum[:, None]

    # 8. L_dev: spread of the distances from each dual vertex to the plain (unweighted) crossings of its edges.
    u_plain = (x0 * s1[:, None] - x1 * s0[:, None]) / (s1 - s0)[:, None]
    dist = (dual_pos[dual] - u_plain).norm(dim=1)
    count = torch.zeros(num_dual, device=device, dtype=dtype).index_add(0, dual, torch.ones_like(dist))
    mean_dist = torch.zeros(num_dual, device=device, dtype=dtype).index_add(0, dual, dist) / count
    dev = torch.zeros(num_dual, device=device, dtype=dtype).index_add(
        0, dual, (dist - mean_dist[dual]).abs()) / count

    lo, hi = torch.minimum(c0, c1), torch.maximum(c0, c1)
    edge_key = ((lo * len(corner_sdf) + hi) << 2) + EDGE_SLOT.to(device)[ent_e]
    low = voxel_corners[ent_v, EDGE_LOW_CORNER.to(device)[ent_e]]
    return dual_pos, dev, edge_key, dual + base, s0 <= 0, corner_sdf[low] >= 0


def extract_surface(coords: torch.Tensor, corner_positions: torch.Tensor, corner_sdf: torch.Tensor,
                    voxel_corners: torch.Tensor, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                    gamma: torch.Tensor | None = None, training: bool = False,
                    table: VoxelHash | None = None, weight_activation=None,
                    chunk: int = CHUNK_SURFACE_VOXELS) -> Extraction:
    """Extract the FlexiCubes mesh of active voxels.

    Args:
        coords: ``[N, 4]`` (or ``[N, 3]``) active voxel coordinates.
        corner_positions: ``[Nc, 3]`` (deformed) corner positions.
        corner_sdf: ``[Nc]`` SDF at the corners; inside where s < 0.
        voxel_corners: ``[N, 8]`` corner rows of each voxel (SPEC corner order).
        alpha, beta, gamma: activated FlexiCubes weights ``[N, 8]``, ``[N, 12]``, ``[N]`` (default 1, 1, 0.5).
        training: split each quad in 4 around a gamma-weighted centre vertex (so gamma gets gradients) instead of
            along the diagonal with the larger product of gamma.
        table: a prebuilt :class:`VoxelHash` of ``coords`` to reuse.
        weight_activation: if given, ``alpha, beta, gamma`` are raw values and ``weight_activation(kind, raw)``
            activates them; it is applied only to the rows surface voxels use, which saves memory at high resolution.
        chunk: surface voxels whose crossings are worked out at once (the result does not depend on it).
    """
    coords = batched(coords)
    device, dtype = corner_positions.device, corner_positions.dtype
    n = len(coords)
    act = weight_activation or (lambda kind, w: w)
    if alpha is None:
        alpha, act_alpha = torch.ones(n, 8, device=device, dtype=dtype), (lambda w: w)
    else:
        act_alpha = lambda w: act("alpha", w)  # noqa: E731
    if beta is None:
        beta, act_beta = torch.ones(n, 12, device=device, dtype=dtype), (lambda w: w)
    else:
        act_beta = lambda w: act("beta", w)  # noqa: E731
    if gamma is None:
        gamma, act_gamma = torch.full((n,), 0.5, device=device, dtype=dtype), (lambda w: w)
    else:
        act_gamma = lambda w: act("gamma", w)  # noqa: E731

    # 1. Case ids, ambiguity fix, surface voxels.
    cases = voxel_cases(corner_sdf, voxel_corners)
    cases = resolve_ambiguity(coords, cases, table)
    surf = ((cases != 0) & (cases != 255)).nonzero().squeeze(1)
    surf_cases = cases[surf]
    del cases

    patches = NUM_PATCHES.to(device)[surf_cases]
    first_dual = torch.cumsum(patches, 0) - patches
    num_dual = int(patches.sum())

    # 2-4 and 8, chunk by chunk of surface voxels: every quantity here is local to a voxel and its dual vertices, so
    # only the chunk's entries are alive at once (at 1024^3 the entries of all voxels were most of the peak memory);
    # what the quads need later is kept per entry in 18 bytes.
    parts = [_crossings(surf[i:i + chunk], surf_cases[i:i + chunk], first_dual[i:i + chunk], voxel_corners,
                        corner_positions, corner_sdf, alpha, beta, act_alpha, act_beta)
             for i in range(0, len(surf), chunk)] or [_crossings(surf, surf_cases, first_dual, voxel_corners,
                                                                  corner_positions, corner_sdf, alpha, beta,
                                                                  act_alpha, act_beta)]
    dual_pos, dev, edge_key, dual, inside_first, flip_entry = (
        p[0] if len(parts) == 1 else torch.cat(p) for p in zip(*parts))
    del parts
    dual_voxel = torch.repeat_interleave(surf, patches)

    # 5. Quads: group entries by grid edge, ordered counter-clockwise around it; keep edges with 4 active voxels.
    order = torch.argsort(edge_key)
    key_sorted = edge_key[order] >> 2
    del edge_key
    _, counts = torch.unique_consecutive(key_sorted, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    edge_ids = key_sorted[starts]
    del key_sorted
    nc = len(corner_sdf)
    crossing_edges = torch.stack([edge_ids // nc, edge_ids % nc], 1)
    del edge_ids
    first_entry = order[starts[counts == 4]]
    quads = dual[order[starts[counts == 4, None] + torch.arange(4, device=device)]]
    del order, starts, counts, dual
    # Orient towards s > 0: the slot order gives a normal along +axis, right when the low end is the inside one.
    flip = flip_entry[first_entry]
    quads[flip] = quads[flip][:, [0, 3, 2, 1]]
    del flip, flip_entry

    # 6. Triangulation.
    g = act_gamma(gamma[dual_voxel])[quads]
    if training:
        w02, w13 = g[:, 0] * g[:, 2], g[:, 1] * g[:, 3]
        p = dual_pos[quads]
        centre = ((w02[:, None] * (p[:, 0] + p[:, 2]) + w13[:, None] * (p[:, 1] + p[:, 3])) / 2
                  / (w02 + w13)[:, None])
        centre_id = num_dual + torch.arange(len(quads), device=device)
        nxt = quads[:, [1, 2, 3, 0]]
        faces = torch.stack([quads, nxt, centre_id[:, None].expand(-1, 4)], dim=-1).reshape(-1, 3)
        vertices = torch.cat([dual_pos, centre], 0)
        vertex_batch = torch.cat([coords[dual_voxel, 0], coords[dual_voxel[quads[:, 0]], 0]])
    else:
        # Along the diagonal with the larger gamma product (slots 0-2 join the voxels at (-,-) and (+,+)). On a
        # tie (saturated or default weights) the reference FlexiCubes and the TripoSF release take (-,-)/(+,+)
        # unless the SDF at the edge's first corner (SPEC edge order) is positive.
        g02, g13 = g[:, 0] * g[:, 2], g[:, 1] * g[:, 3]
        split13 = ~((g02 > g13) | ((g02 == g13) & inside_first[first_entry]))
        del g, g02, g13
        faces = quads[:, [0, 1, 2, 0, 2, 3]]
        faces[split13] = quads[split13][:, [0, 1, 3, 1, 2, 3]]
        faces = faces.view(-1, 3)
        vertices = dual_pos
        vertex_batch = coords[dual_voxel, 0]
    del quads, inside_first, first_entry

    # Drop dual vertices no face uses (patches whose edges all lie at an open boundary).
    used = torch.zeros(len(vertices), dtype=torch.bool, device=device)
    used[faces.reshape(-1)] = True
    if not bool(used.all()):
        remap = torch.cumsum(used, 0) - 1
        faces, vertices, vertex_batch = remap[faces], vertices[used], vertex_batch[used]
    return Extraction(vertices=vertices, faces=faces, vertex_batch=vertex_batch, dev=dev,
                      dual_voxel=dual_voxel, crossing_edges=crossing_edges, num_dual=num_dual)

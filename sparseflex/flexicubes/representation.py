"""The SparseFlex representation (SPEC section 1): active voxels, corner SDF and deformation, FlexiCubes weights."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..sparse.coords import CORNER_OFFSETS, VoxelHash, batched, coords_to_keys, corner_lattice, dilate, subdivide
from .extract import Extraction, extract_surface

HEAD_CHANNELS = 53
_SDF, _DEFORM, _BETA, _ALPHA, _GAMMA = slice(0, 8), slice(8, 32), slice(32, 44), slice(44, 52), slice(52, 53)


def activate_weight(kind: str, raw: torch.Tensor) -> torch.Tensor:
    """Release activations: beta, alpha = tanh(raw) * 0.99 + 1; gamma = sigmoid(raw) * 0.99 + 0.005."""
    if kind == "gamma":
        return torch.sigmoid(raw) * 0.99 + 0.005
    return torch.tanh(raw) * 0.99 + 1


def last_row_per_voxel(coords: torch.Tensor) -> torch.Tensor:
    """Rows of ``coords [N, 4]`` that are the last occurrence of their voxel, in increasing order."""
    keys = coords_to_keys(coords)
    order = torch.sort(keys, stable=True).indices
    ks = keys[order]
    last = torch.ones_like(ks, dtype=torch.bool)
    last[:-1] = ks[1:] != ks[:-1]
    return order[last].sort().values


def max_displacement(resolution: int) -> float:
    """The deformation's range: a corner moves at most (1 - 1e-8) / (2R) per axis, just under half a voxel, so
    neighbouring corners never cross."""
    return (1 - 1e-8) / (2 * resolution)


def deform_for(displacement: torch.Tensor, resolution: int) -> torch.Tensor:
    """Pre-activation ``deform`` that moves corners by ``displacement`` (world units, clipped to the range)."""
    return torch.atanh((displacement / max_displacement(resolution)).clamp(-0.999, 0.999))


@dataclass
class SparseFlex:
    """A SparseFlex at resolution ``R`` in the cube [-0.5, 0.5]^3.

    ``sdf`` is in world units (inside where negative); ``deform``, ``alpha_raw``, ``beta_raw`` and ``gamma_raw`` are
    pre-activation values, so zeros give the undeformed grid with neutral weights.
    """
    coords: torch.Tensor         # [N, 4] int64 active voxels (batch, x, y, z)
    resolution: int
    corners: torch.Tensor        # [Nc, 4] int64 unique corners
    voxel_corners: torch.Tensor  # [N, 8] corner rows per voxel
    sdf: torch.Tensor            # [Nc]
    deform: torch.Tensor         # [Nc, 3]
    alpha_raw: torch.Tensor      # [N, 8]
    beta_raw: torch.Tensor       # [N, 12]
    gamma_raw: torch.Tensor      # [N]
    consistency: torch.Tensor | None = None  # head-built only: MSE of per-voxel corner values to their shared mean

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_sdf(cls, coords: torch.Tensor, resolution: int, corner_sdf_fn) -> "SparseFlex":
        """Build from voxels and a function mapping ``[Nc, 3]`` undeformed corner positions to SDF values."""
        coords = batched(coords)
        corners, voxel_corners = corner_lattice(coords)
        pos = corners[:, 1:].float() / resolution - 0.5
        sdf = corner_sdf_fn(pos).to(pos.dtype)
        n, nc = len(coords), len(corners)
        zeros = pos.new_zeros
        return cls(coords, resolution, corners, voxel_corners, sdf, zeros(nc, 3), zeros(n, 8), zeros(n, 12), zeros(n))

    @classmethod
    def from_head(cls, coords: torch.Tensor, resolution: int, head: torch.Tensor,
                  repeated_voxels: bool = False) -> "SparseFlex":
        """Build from a network's 53-channel head output per voxel (release layout and activations).

        Shared corners take the mean over the voxels touching them; ``consistency`` holds the MSE between each
        voxel's own prediction and that mean. With ``repeated_voxels`` a voxel may come in several rows (the
        release's chunked decoding): every row enters the corner means, and the voxel keeps the FlexiCubes weights
        of its LAST row, as the release's scatter does.
        """
        if head.shape[-1] != HEAD_CHANNELS:
            raise ValueError(f"head must have {HEAD_CHANNELS} channels, got {head.shape[-1]}")
        coords = batched(coords)
        corners, voxel_corners = corner_lattice(coords)
        r = resolution
        per_voxel = torch.cat([head[:, _SDF, None] * (4.0 / r) - 1.0 / r,
                               head[:, _DEFORM].reshape(-1, 8, 3)], dim=2)  # [N, 8, 4]: sdf, deform xyz
        flat_idx = voxel_corners.reshape(-1)
        total = head.new_zeros(len(corners), 4).index_add(0, flat_idx, per_voxel.reshape(-1, 4))
        count = head.new_zeros(len(corners)).index_add(0, flat_idx, head.new_ones(len(flat_idx)))
        shared = total / count[:, None]
        consistency = ((per_voxel - shared[voxel_corners]) ** 2).mean() if len(head) else head.new_zeros(())
        if repeated_voxels:
            rows = last_row_per_voxel(coords)
            coords, voxel_corners, head = coords[rows], voxel_corners[rows], head[rows]
        return cls(coords, resolution, corners, voxel_corners, shared[:, 0], shared[:, 1:],
                   head[:, _ALPHA], head[:, _BETA], head[:, 52], consistency)

    # -- geometry -----------------------------------------------------------------------------------------------
    @property
    def num_voxels(self) -> int:
        return len(self.coords)

    def displacement(self) -> torch.Tensor:
        """World-space corner displacement: (1 - 1e-8) / (2R) * tanh(deform) (at most half a voxel)."""
        return max_displacement(self.resolution) * torch.tanh(self.deform)

    def corner_positions(self) -> torch.Tensor:
        """Deformed corner positions: v / R - 0.5 + :meth:`displacement`."""
        return self.corners[:, 1:].to(self.sdf.dtype) / self.resolution - 0.5 + self.displacement()

    def voxel_centers(self) -> torch.Tensor:
        return (self.coords[:, 1:].to(self.sdf.dtype) + 0.5) / self.resolution - 0.5

    def weights(self):
        """Activated (alpha, beta, gamma)."""
        return (activate_weight("alpha", self.alpha_raw), activate_weight("beta", self.beta_raw),
                activate_weight("gamma", self.gamma_raw))

    def extract(self, training: bool = False, table: VoxelHash | None = None, **kwargs) -> Extraction:
        """Extract the mesh of all active voxels (see :func:`extract_surface`)."""
        return extract_surface(self.coords, self.corner_positions(), self.sdf, self.voxel_corners,
                               self.alpha_raw, self.beta_raw, self.gamma_raw, training=training, table=table,
                               weight_activation=activate_weight, **kwargs)

    # -- voxel-set edits ----------------------------------------------------------------------------------------
    def section_rows(self, voxel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of a subset of voxels: (voxel rows ``[n]``, corner rows in use ``[nc]``, their ``voxel_corners``
        renumbered into the corner rows ``[n, 8]``). Column by column: no ``[n, 8]`` temporaries besides the result."""
        idx = voxel_mask.nonzero().squeeze(1) if voxel_mask.dtype == torch.bool else voxel_mask
        vc = self.voxel_corners
        # corners still in use, renumbered in order: a mask and a cumulative sum, no sort (this runs every step)
        in_use = torch.zeros(len(self.corners), dtype=torch.bool, device=vc.device)
        for k in range(8):
            in_use[vc[idx, k]] = True
        used = in_use.nonzero().squeeze(1)
        del in_use
        # the new numbers of the corners in use only (a full-size cumulative sum would cost 8 bytes per corner)
        renumber = torch.empty(len(self.corners), dtype=torch.int32 if len(used) < 2 ** 31 else torch.long,
                               device=vc.device)
        renumber[used] = torch.arange(len(used), dtype=renumber.dtype, device=vc.device)
        new_vc = vc.new_empty(len(idx), 8)
        for k in range(8):
            new_vc[:, k] = renumber[vc[idx, k]]
        return idx, used, new_vc

    def select(self, voxel_mask: torch.Tensor) -> "SparseFlex":
        """The SparseFlex restricted to a subset of voxels (e.g. a camera's frustum section); differentiable."""
        idx, used, vc = self.section_rows(voxel_mask)
        return replace(self, coords=self.coords[idx], corners=self.corners[used], voxel_corners=vc,
                       sdf=self.sdf[used], deform=self.deform[used], alpha_raw=self.alpha_raw[idx],
                       beta_raw=self.beta_raw[idx], gamma_raw=self.gamma_raw[idx], consistency=None)

    @torch.no_grad()
    def keep_(self, voxel_mask: torch.Tensor) -> "SparseFlex":
        """In place and detached, :meth:`select` for a SparseFlex nothing else refers to: each tensor is replaced as
        soon as its copy exists, so the peak is one tensor twice, not the whole SparseFlex twice (dropping a few
        voxels of a 1024^3 band would otherwise copy ~2.5 GB)."""
        idx, used, new_vc = self.section_rows(voxel_mask)
        self.voxel_corners = new_vc
        for name in ("coords", "alpha_raw", "beta_raw", "gamma_raw"):
            setattr(self, name, getattr(self, name)[idx])
        for name in ("corners", "sdf", "deform"):
            setattr(self, name, getattr(self, name)[used])
        self.consistency = None
        return self

    def subdivide(self) -> "SparseFlex":
        """Each voxel into 8 children at resolution 2R.

        Corner SDF and corner displacement are interpolated trilinearly inside the parent voxel (so the initial
        zero set is the parent's trilinear one); the FlexiCubes weights start neutral again.
        """
        child_coords = subdivide(self.coords)
        corners, voxel_corners = corner_lattice(child_coords)
        n_child = len(child_coords)
        # One (child voxel, local corner) entry per unique child corner; its parent voxel does the interpolation.
        entry = torch.empty(len(corners), dtype=torch.long, device=corners.device)
        entry.index_copy_(0, voxel_corners.reshape(-1), torch.arange(n_child * 8, device=corners.device))
        parent = entry // 64  # 8 children per parent, 8 corners per child
        t = corners[:, 1:].to(self.sdf.dtype) / 2 - self.coords[parent, 1:].to(self.sdf.dtype)  # in {0, .5, 1}^3
        off = CORNER_OFFSETS.to(t).bool()
        w = torch.prod(torch.where(off[None], t[:, None], 1 - t[:, None]), dim=-1)  # [Nc, 8 parent corners]
        vals = torch.cat([self.sdf[:, None], self.displacement()], 1)[self.voxel_corners[parent]]  # [Nc, 8, 4]
        interp = torch.einsum("nk,nkd->nd", w, vals)
        deform = deform_for(interp[:, 1:], 2 * self.resolution)
        n = n_child
        zeros = self.sdf.new_zeros
        return SparseFlex(child_coords, self.resolution * 2, corners, voxel_corners, interp[:, 0], deform,
                          zeros(n, 8), zeros(n, 12), zeros(n))

    def surface_mask(self) -> torch.Tensor:
        """Voxels whose corners change sign (the voxels that hold surface)."""
        inside = (self.sdf < 0)[self.voxel_corners]
        return inside.any(dim=1) & ~inside.all(dim=1)

    def prune(self, margin: int = 1) -> "SparseFlex":
        """Keep the voxels that hold surface and those within ``margin`` voxels of them (detached copy)."""
        keep = self.surface_mask()
        if margin > 0:
            grown = dilate(self.coords[keep], margin)
            keep = VoxelHash(grown).lookup(self.coords) >= 0
        return self.detach().select(keep)

    def detach(self) -> "SparseFlex":
        return replace(self, **{k: v.detach() for k, v in self.parameters_dict().items()}, consistency=None)

    def parameters_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in ("sdf", "deform", "alpha_raw", "beta_raw", "gamma_raw")}

"""Mesh data: loading and cleaning, normalisation, surface sampling, voxelisation."""

from .mesh import Mesh, Normalization, load_mesh, normalize, save_mesh
from .sampling import sample_surface
from .voxelize import active_voxels, jittered_voxels, voxel_centers, voxelize

__all__ = ["Mesh", "Normalization", "active_voxels", "jittered_voxels", "load_mesh", "normalize", "save_mesh",
           "sample_surface", "voxel_centers", "voxelize"]

"""Mesh data: loading and cleaning, normalisation, surface sampling, voxelisation; input images for image-to-3D."""

from .images import load_image, preprocess_image
from .mesh import Mesh, Normalization, load_mesh, normalize, save_mesh
from .sampling import sample_surface
from .voxelize import active_voxels, jittered_voxels, voxel_centers, voxelize

__all__ = ["Mesh", "Normalization", "active_voxels", "jittered_voxels", "load_image", "load_mesh", "normalize",
           "preprocess_image", "save_mesh", "sample_surface", "voxel_centers", "voxelize"]

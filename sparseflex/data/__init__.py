"""Mesh data: loading and cleaning, normalisation, surface sampling, voxelisation; input images for image-to-3D."""

from .images import load_image, preprocess_image
from .latents import LatentDataset, denormalize_latent, encode_dataset, latent_stats, normalize_latent
from .mesh import Mesh, Normalization, load_mesh, normalize, save_mesh
from .sampling import sample_surface
from .voxelize import active_voxels, jittered_voxels, voxel_centers, voxelize

__all__ = ["LatentDataset", "Mesh", "Normalization", "active_voxels", "denormalize_latent", "encode_dataset",
           "jittered_voxels", "latent_stats", "load_image", "load_mesh", "normalize", "normalize_latent",
           "preprocess_image", "save_mesh", "sample_surface", "voxel_centers", "voxelize"]

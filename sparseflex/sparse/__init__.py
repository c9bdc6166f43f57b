"""Sparse voxel sets: int64 keys, hashing, neighbours, corner lattices, subdivision, dilation."""

from .coords import (CORNER_OFFSETS, VoxelHash, batched, coords_to_keys, corner_lattice, dense_grid, dilate,
                     downsample, kernel_offsets, keys_to_coords, neighbour_map, subdivide, unique_coords)

__all__ = ["CORNER_OFFSETS", "VoxelHash", "batched", "coords_to_keys", "corner_lattice", "dense_grid", "dilate",
           "downsample", "kernel_offsets", "keys_to_coords", "neighbour_map", "subdivide", "unique_coords"]

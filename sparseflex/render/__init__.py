"""Differentiable rendering: cameras, visibility, maps (mask, depth, normal) and frustum-aware sectional voxels.

Small composable primitives with plain tensors in and out, in the spirit of nvdiffrast:
``rasterize`` (triangle id per pixel, torch or Embree) -> ``surface_maps`` / ``barycentrics`` / ``interpolate``
(differentiable) -> ``antialias`` (silhouette gradients); ``render`` chains them.
"""

from .camera import (Camera, cat_cameras, fibonacci_sphere, interior_views, intrinsics, look_at, random_views,
                     sphere_views, zoom_views)
from .frustum import adaptive_planes, frustum_mask, section
from .maps import Topology, antialias, barycentrics, interpolate, mesh_topology, render, surface_maps
from .visibility import cast_rays, embree_available, rasterize

__all__ = ["Camera", "cat_cameras", "fibonacci_sphere", "interior_views", "intrinsics", "look_at", "random_views",
           "sphere_views", "zoom_views", "adaptive_planes", "frustum_mask", "section", "Topology", "antialias",
           "barycentrics", "interpolate", "mesh_topology", "render", "surface_maps", "cast_rays", "embree_available",
           "rasterize"]

"""SparseFlex: high-resolution, arbitrary-topology 3D shape modelling on sparse voxels (pure PyTorch)."""

from .errors import SparseFlexError

__version__ = "0.1.0"
__all__ = ["SparseFlexError", "__version__"]

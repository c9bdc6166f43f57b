"""FlexiCubes on sparse voxels: generated tables, extraction, the SparseFlex representation, regularisers."""

from .extract import Extraction, extract_surface, resolve_ambiguity, voxel_cases
from .regularizers import sdf_sign_loss, weight_l1
from .representation import HEAD_CHANNELS, SparseFlex, activate_weight

__all__ = ["Extraction", "extract_surface", "resolve_ambiguity", "voxel_cases", "sdf_sign_loss", "weight_l1",
           "HEAD_CHANNELS", "SparseFlex", "activate_weight"]

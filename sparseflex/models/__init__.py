"""Learned models: the SparseFlex VAE (configs, self-pruning upsampling, checkpoints, encoder inputs) and the
DINOv2 image encoder for image conditioning."""

from ..data.voxelize import jittered_voxels
from .checkpoint import Checkpoint, load_model, load_weights, read_checkpoint, save_weights
from .configs import CONFIGS, VAEConfig, get_config, read_config
from .flow import FlowLoss, RectifiedFlow
from .image_encoder import ImageEncoder, ImageEncoderConfig, load_image_encoder
from .inputs import EncoderInputs, mesh_inputs, point_inputs
from .slat_flow import (SLAT_FLOW_CONFIGS, SLatFlow, SLatFlowConfig, SparseResBlock3d, get_slat_flow_config,
                        read_slat_flow_config)
from .structure_flow import (STRUCTURE_FLOW_CONFIGS, StructureFlow, StructureFlowConfig, get_structure_flow_config,
                             read_structure_flow_config)
from .structure_vae import (STRUCTURE_VAE_CONFIGS, StructureVAE, StructureVAEConfig, StructureVAEOutput, dice,
                            get_structure_vae_config, grid_to_coords, iou, occupancy_grid, structure_vae_loss)
from .upsample import PruningHead, SelfPruningUpsample, chunk_rows
from .vae import (CHUNKINGS, PruneOutput, SparseFlexDecoder, SparseFlexEncoder, SparseFlexVAE, VAEDecoding,
                  kl_divergence, occupancy_bce, pruning_bce, release_chunks)

__all__ = [
    "CHUNKINGS", "CONFIGS", "Checkpoint", "EncoderInputs", "FlowLoss", "ImageEncoder", "ImageEncoderConfig",
    "PruneOutput", "PruningHead", "RectifiedFlow", "STRUCTURE_FLOW_CONFIGS", "SelfPruningUpsample",
    "SparseFlexDecoder", "SparseFlexEncoder", "SparseFlexVAE", "StructureFlow", "StructureFlowConfig", "VAEConfig",
    "VAEDecoding", "chunk_rows", "get_config", "get_structure_flow_config", "jittered_voxels", "kl_divergence",
    "load_image_encoder", "load_model", "load_weights", "mesh_inputs", "occupancy_bce", "point_inputs", "pruning_bce",
    "read_checkpoint", "read_config", "read_structure_flow_config", "release_chunks", "save_weights",
    "SLAT_FLOW_CONFIGS", "SLatFlow", "SLatFlowConfig", "SparseResBlock3d", "get_slat_flow_config",
    "read_slat_flow_config",
    "STRUCTURE_VAE_CONFIGS", "StructureVAE", "StructureVAEConfig", "StructureVAEOutput", "dice",
    "get_structure_vae_config", "grid_to_coords", "iou", "occupancy_grid", "structure_vae_loss",
]

"""pipelines: end-to-end uses of the learned models (VAE reconstruction, encoding and decoding; image -> structure)."""

from .reconstruct import (Latent, Reconstruction, decode_latent, default_num_points, encode_mesh, load_latent,
                          reconstruct, save_latent)
from .samplers import (classifier_free_guidance, euler_sample, gaussian_noise, guidance_interval, guided_velocity,
                       model_velocity, shift_time, time_grid)
from .structure import StructurePipeline, StructureResult, load_structure_flow, load_structure_vae

__all__ = [
    "Latent", "Reconstruction", "StructurePipeline", "StructureResult", "classifier_free_guidance", "decode_latent", "default_num_points", "encode_mesh",
    "euler_sample", "gaussian_noise", "guidance_interval", "guided_velocity", "load_latent", "load_structure_flow", "load_structure_vae", "model_velocity",
    "reconstruct", "save_latent", "shift_time", "time_grid",
]

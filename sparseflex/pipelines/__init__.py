"""pipelines: end-to-end uses of the learned models (VAE reconstruction, encoding and decoding)."""

from .reconstruct import (Latent, Reconstruction, decode_latent, default_num_points, encode_mesh, load_latent,
                          reconstruct, save_latent)

__all__ = ["Latent", "Reconstruction", "decode_latent", "default_num_points", "encode_mesh", "load_latent",
           "reconstruct", "save_latent"]

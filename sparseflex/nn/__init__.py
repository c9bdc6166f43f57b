"""Sparse neural-network building blocks in pure torch (CPU and CUDA): one SparseTensor type, feature-wise layers and
norms, submanifold convolution, resampling, windowed / full / cross attention, embeddings, local PointNet and
transformer blocks."""

from .attention import (SparseCrossAttention, SparseFullSelfAttention, SparseWindowSelfAttention, VarlenPlan,
                        sample_plan, window_ids, window_plan)
from .basic import SparseGELU, SparseGroupNorm, SparseLayerNorm, SparseLinear, SparseReLU, SparseSiLU
from .conv import ConvPlan, SparseConv3d, conv_plan
from .embedding import (AbsolutePositionEmbedder, TimestepEmbedder, adaln_modulation, gate, modulate,
                        sincos_position_embedding, timestep_embedding)
from .modulated import (FeedForward, FinalLayer, ModulatedTransformerCrossBlock, MultiHeadAttention, MultiHeadRMSNorm,
                        from_padded, to_padded)
from .pointnet import LocalPointNet, ResnetBlockFC, local_point_features
from .resample import segment_reduce, sparse_downsample, sparse_subdivide, sparse_upsample
from .sparse_tensor import SparseTensor, sparse_cat
from .transformer import SparseFeedForward, SparseTransformerBlock

__all__ = [
    "AbsolutePositionEmbedder", "ConvPlan", "FeedForward", "FinalLayer", "LocalPointNet",
    "ModulatedTransformerCrossBlock", "MultiHeadAttention", "MultiHeadRMSNorm",
    "ResnetBlockFC", "SparseConv3d", "SparseCrossAttention", "SparseFeedForward", "SparseFullSelfAttention",
    "SparseGELU", "SparseGroupNorm", "SparseLayerNorm", "SparseLinear", "SparseReLU", "SparseSiLU", "SparseTensor",
    "SparseTransformerBlock", "SparseWindowSelfAttention", "TimestepEmbedder", "VarlenPlan", "adaln_modulation",
    "conv_plan", "from_padded", "gate", "local_point_features", "modulate", "sample_plan", "segment_reduce",
    "sincos_position_embedding", "sparse_cat", "sparse_downsample", "sparse_subdivide", "sparse_upsample",
    "timestep_embedding", "to_padded", "window_ids", "window_plan",
]

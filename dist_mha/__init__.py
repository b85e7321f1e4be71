"""dist_mha: Keras 3's attention layers for PyTorch: pluggable kernels, tensor parallelism."""

from dist_mha.layers.group_query_attention import GroupQueryAttention
from dist_mha.layers.multi_head_attention import MultiHeadAttention
from dist_mha.models.block import TransformerBlock

__all__ = ["GroupQueryAttention", "MultiHeadAttention", "TransformerBlock"]
__version__ = "0.1.0"

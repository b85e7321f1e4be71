"""dist_mha: Keras 3's MultiHeadAttention for PyTorch: pluggable kernels, tensor parallelism."""

from dist_mha.block import TransformerBlock
from dist_mha.layer import MultiHeadAttention

__all__ = ["MultiHeadAttention", "TransformerBlock"]
__version__ = "0.1.0"

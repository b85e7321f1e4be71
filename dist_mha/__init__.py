"""dist_mha: Keras 3's MultiHeadAttention for PyTorch, with pluggable local kernels."""

from dist_mha.layer import MultiHeadAttention

__all__ = ["MultiHeadAttention"]
__version__ = "0.1.0"

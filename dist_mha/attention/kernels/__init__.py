"""Local attention kernels (flash-attn, SDPA, exact math) and their dispatcher."""

from dist_mha.attention.kernels.dispatch import BACKENDS, attention, select
from dist_mha.attention.kernels.request import AttentionRequest

__all__ = ["AttentionRequest", "BACKENDS", "attention", "select"]

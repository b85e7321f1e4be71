"""Hugging Face checkpoints in and out: `from_hf` (sharded loading) and `to_hf` (export)."""

from dist_mha.models.hf.export import to_hf
from dist_mha.models.hf.load import from_hf

__all__ = ["from_hf", "to_hf"]

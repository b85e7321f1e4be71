"""Checkpoint files: atomic writes with checksums, and tensor-parallel shard sets that load at any TP degree."""

from dist_mha.checkpoint.shards import CheckpointError, load_tp_shard, save_tp_shard, verify_tp_shards

__all__ = ["CheckpointError", "load_tp_shard", "save_tp_shard", "verify_tp_shards"]

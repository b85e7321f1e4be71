"""Parallelism: process groups, region collectives, head sharding, checkpoints, context parallelism."""

from dist_mha.parallel.collectives import (
    all_to_all_tp,
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)
from dist_mha.parallel.cp.layout import gather_sequence, shard_sequence
from dist_mha.parallel.state import MPU, ParallelState, build_parallel_state

__all__ = [
    "MPU",
    "ParallelState",
    "all_to_all_tp",
    "build_parallel_state",
    "copy_to_tp",
    "gather_sequence",
    "gather_from_sp",
    "gather_from_tp",
    "reduce_from_tp",
    "reduce_scatter_to_sp",
    "scatter_to_tp",
    "shard_sequence",
]

"""Entering and leaving the tensor-parallel region of one attention call.

Shape legend: B batch, T sequence (local T/tp under sequence parallelism), E features.

Without sequence parallelism the inputs are replicated: entering is
`copy_to_tp` over the distinct inputs (one fused backward all-reduce even
for cross-attention) and leaving is one all-reduce of the partial output.
With it, inputs arrive sharded on dim 1: entering all-gathers them, leaving
reduce-scatters the output back to dim-1 shards.
"""

from __future__ import annotations

import torch

from dist_mha.parallel.collectives import (
    copy_to_tp,
    gather_from_sp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)

SEQ_DIM = 1


def enter(group, sequence_parallel: bool, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Full, replicated versions of `xs` (distinct tensors communicated once)."""
    unique: list[torch.Tensor] = []
    for x in xs:
        if not any(x is u for u in unique):
            unique.append(x)
    if sequence_parallel:
        entered = [gather_from_sp(group, u, SEQ_DIM) for u in unique]
    else:
        entered = copy_to_tp(group, *unique)
        entered = list(entered) if isinstance(entered, tuple) else [entered]
    return tuple(entered[next(i for i, u in enumerate(unique) if u is x)] for x in xs)


def leave(group, sequence_parallel: bool, partial_BTE: torch.Tensor, bias) -> torch.Tensor:
    """Sums the ranks' partial outputs (all-reduce, or reduce-scatter on dim 1) and adds the bias once."""
    if sequence_parallel:
        out = reduce_scatter_to_sp(group, partial_BTE, SEQ_DIM)
        if bias is not None:
            # Each rank adds the bias to its own rows only, so its gradient is
            # partial per rank: entering the bias into the region sums it.
            out = out + copy_to_tp(group, bias).to(out.dtype)
        return out
    # The partial output is a fresh tensor nothing else reads: sum it where it lies.
    out = reduce_from_tp(group, partial_BTE, inplace=True)
    return out if bias is None else out + bias.to(out.dtype)

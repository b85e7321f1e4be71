"""TP-invariant dropout: keep-masks that are a pure function of (seed, call, global element index).

Shape legend: B batch, N query heads (all of them, across the TP group), T
query positions, S key positions.

With `dropout_mode="tp_invariant"` every kernel (the math path, ring blocks,
Ulysses's local call) takes its dropout keep-mask from here, so the masks of
a head and position are the same at every TP degree and CP layout, and one
device reproduces a parallel run exactly.
"""

from __future__ import annotations

import torch

from dist_mha.rng.counter import keep_mask, mix64
from dist_mha.rng.streams import CallCounter


def invariant_keep_mask(seed: int, call: int, global_shape, index, rate: float, device) -> torch.Tensor:
    """Dropout keep-mask for a block of a global `(B, N, T, S)` probability tensor.

    Each element is kept iff its counter-based uniform (keyed by seed, call
    index and global element index) is >= `rate`, so the mask of every head
    is the same whatever the TP degree. Built a few million elements at a
    time (`counter_rng.keep_mask`): at B=8, 32 heads, T=S=2048 the transient
    memory is the 1-byte mask plus ~130 MB, not the ~35 GB of uniforms.
    """
    return keep_mask(mix64(seed, call), global_shape, index, rate, device=device)


class InvariantKeep:
    """The TP-invariant dropout keep-masks of one attention call, for heads `[h0, h1)` of `num_heads`.

    A pure function of (seed, call index, global batch, head, query, key
    position): every TP degree, CP layout and kernel draws the same mask for
    the same element. Called as `keep(shape_BNTS, device)` for the whole
    `(T, S)` of this rank's heads, or `keep.block(q_range, k_range, B, device)`
    for one block of global positions (ring attention).
    """

    def __init__(self, counter: CallCounter, num_heads: int, T: int, S: int, h0: int, h1: int, rate: float):
        self.seed, self.call = counter.seed, counter.next()
        self.num_heads, self.T, self.S, self.h0, self.h1, self.rate = num_heads, T, S, h0, h1, rate

    def block(self, q_range, k_range, B: int, device) -> torch.Tensor:
        index = (slice(None), slice(self.h0, self.h1), slice(*q_range), slice(*k_range))
        return invariant_keep_mask(self.seed, self.call, (B, self.num_heads, self.T, self.S), index, self.rate, device)

    def __call__(self, shape_BNTS, device) -> torch.Tensor:
        return self.block((0, self.T), (0, self.S), shape_BNTS[0], device)

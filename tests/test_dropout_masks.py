"""TP-invariant dropout masks: built in chunks, bit for bit the masks of the whole-block formula."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_mha.rng.counter import keep_mask, mix64, uniform
from dist_mha.rng.invariant import invariant_keep_mask


@pytest.mark.parametrize("shape,index", [
    ((3, 4, 5, 7), (slice(None), slice(1, 3))),
    ((2, 6, 9, 4), (1, slice(2, 6))),          # an int index drops that dim
    ((5, 33), None),
    ((2, 3, 1, 8), (slice(1, 2), slice(None), slice(None), slice(2, 7))),
])
@pytest.mark.parametrize("chunk_elems", [1, 7, 40, 10**9])  # every split position, and no split
@pytest.mark.parametrize("rate", [0.0, 1e-17, 0.1, 0.5, 0.97])
def test_chunked_keep_mask_equals_uniform_comparison(shape, index, chunk_elems, rate):
    key = mix64(3, 11)
    expected = uniform(key, shape, index) >= rate
    got = keep_mask(key, shape, index, rate, chunk_elems=chunk_elems)
    assert got.dtype == torch.bool and got.shape == expected.shape
    assert torch.equal(got, expected)


class _LargestAllocation(TorchDispatchMode):
    """The largest tensor storage any op creates (deterministic, unlike a wall-clock or RSS reading)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_tp_invariant_mask_never_materialises_the_block_in_int64():
    # (B, heads, T, S) = 16M elements: the whole-block formula made 128 MiB int64 (and float64)
    # tensors; chunked, nothing exceeds one 4M-element int64 chunk (32 MiB).
    shape = (2, 8, 1024, 1024)
    with _LargestAllocation() as mode:
        mask = invariant_keep_mask(5, 0, shape, (slice(None), slice(0, 8)), 0.1, "cpu")
    assert mask.shape == shape and mask.dtype == torch.bool
    assert mode.largest <= 8 * (1 << 22), f"{mode.largest / 2**20:.0f} MiB"
    assert abs(mask.float().mean().item() - 0.9) < 1e-3

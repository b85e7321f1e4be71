"""How Keras's N-d attention maps onto the kernels' 4-d layout.

Shape legend (used across dist_mha):
    B  batch (after layout: every non-attention dim of the input folded in)
    T  query positions (after layout: all query attention dims flattened)
    S  key/value positions (likewise)
    N  heads, H key_dim (query/key head size), Hv value_dim
    E  feature size of an input (Dq, Dk, Dv for query, key, value)

Keras projects an input of shape `(B, d_1, ..., d_k, E)` to `(B, d_1, ..., d_k, N, H)`
and attends over `attention_axes` (a subset of `d_1..d_k`) with one joint
softmax over all of them. Its scores are laid out as
`(<non-attention dims>, N, <query attention dims>, <key attention dims>)`.

A joint softmax over several axes is a softmax over their flattened product,
so every case reduces to the kernels' `q_BTNH, k_BSNH, v_BSNH` with
`B = prod(non-attention dims)`, `T = prod(query attention dims)`. For the
common rank-3 input with the default axis this is a no-op (no copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def normalize_attention_axes(attention_axes, input_rank: int) -> tuple[int, ...]:
    """Resolves Keras `attention_axes` against an input rank.

    Args:
        attention_axes: None, an int or a sequence of ints; negative values
            count from the end of the *input* shape, as in Keras.
        input_rank: rank of the query input, including batch and features.

    Returns:
        A tuple of non-negative input dims, in the order given.

    Raises:
        ValueError: if an axis is the batch or feature dim, is out of range,
            or repeats.
    """
    valid = tuple(range(1, input_rank - 1))
    if attention_axes is None:
        return valid
    axes = (attention_axes,) if isinstance(attention_axes, int) else tuple(attention_axes)
    resolved = []
    for axis in axes:
        # Keras resolves negatives against the projected rank minus one,
        # which equals the input rank.
        dim = axis if axis >= 0 else input_rank + axis
        if dim not in valid:
            raise ValueError(
                "Received an invalid value for argument `attention_axes`: axis "
                f"{axis} does not name a dim of a rank-{input_rank} input other "
                f"than the batch (0) and feature ({input_rank - 1}) dims. Valid "
                f"axes are {list(valid)} (or their negative forms). Received: "
                f"attention_axes={attention_axes}"
            )
        if dim in resolved:
            raise ValueError(
                "Received an invalid value for argument `attention_axes`: axis "
                f"{axis} appears twice. Received: attention_axes={attention_axes}"
            )
        resolved.append(dim)
    return tuple(resolved)


@dataclass(frozen=True)
class AttentionLayout:
    """Permutations between Keras's projected layout and `*_BTNH`.

    Args:
        input_rank: rank of the query/key/value inputs (all equal).
        attention_axes: normalized axes from `normalize_attention_axes`.
    """

    input_rank: int
    attention_axes: tuple[int, ...]

    @property
    def batch_dims(self) -> tuple[int, ...]:
        return tuple(d for d in range(self.input_rank - 1) if d not in self.attention_axes)

    @property
    def is_identity(self) -> bool:
        """True for `(B, T, N, H)` already: one batch dim, one attention dim 1."""
        return self.attention_axes == (1,) and self.input_rank == 3

    @property
    def perm(self) -> tuple[int, ...]:
        """Projected `(B, d.., N, H)` -> `(batch dims.., attention dims.., N, H)`."""
        r = self.input_rank
        return self.batch_dims + self.attention_axes + (r - 1, r)

    @property
    def scores_rank(self) -> int:
        return len(self.batch_dims) + 1 + 2 * len(self.attention_axes)

    def to_BTNH(self, x: torch.Tensor) -> torch.Tensor:
        """Projected Keras tensor -> `(B, T, N, H)` (a view when `is_identity`)."""
        if self.is_identity:
            return x
        x = x.permute(self.perm)
        nb, na = len(self.batch_dims), len(self.attention_axes)
        b = math.prod(x.shape[:nb])
        t = math.prod(x.shape[nb : nb + na])
        return x.reshape(b, t, x.shape[-2], x.shape[-1])

    def from_BTNH(self, out_BTNH: torch.Tensor, projected_query_shape) -> torch.Tensor:
        """Kernel output `(B, T, N, Hv)` -> Keras layout `(B, d.., N, Hv)`."""
        if self.is_identity:
            return out_BTNH
        shape = [projected_query_shape[d] for d in self.perm[:-2]]
        x = out_BTNH.reshape(*shape, out_BTNH.shape[-2], out_BTNH.shape[-1])
        inverse = [0] * len(self.perm)
        for i, d in enumerate(self.perm):
            inverse[d] = i
        return x.permute(inverse)

    def scores_from_BNTS(self, scores_BNTS, query_shape, key_shape) -> torch.Tensor:
        """Kernel scores `(B, N, T, S)` -> Keras scores layout."""
        if self.is_identity:
            return scores_BNTS
        batch = [query_shape[d] for d in self.batch_dims]
        tq = [query_shape[d] for d in self.attention_axes]
        sk = [key_shape[d] for d in self.attention_axes]
        return scores_BNTS.reshape(*batch, scores_BNTS.shape[1], *tq, *sk)

    def mask_to_BNTS(self, mask: torch.Tensor, scores_shape) -> torch.Tensor:
        """A bool mask in Keras scores layout (size-1 dims allowed) -> `(B|1, N|1, T|1, S|1)`.

        Args:
            mask: bool tensor of rank `scores_rank`, broadcastable to `scores_shape`.
            scores_shape: the full Keras scores shape.

        A group of dims that is merged is only expanded (and so copied) when the
        mask varies along one of them; otherwise it stays size 1.
        """
        if self.is_identity:
            return mask
        nb, na = len(self.batch_dims), len(self.attention_axes)
        groups = [(0, nb), (nb, nb + 1), (nb + 1, nb + 1 + na), (nb + 1 + na, nb + 1 + 2 * na)]
        for start, end in reversed(groups):
            sizes = tuple(mask.shape[start:end])
            if all(s == 1 for s in sizes):
                merged = [1]
            else:
                full = tuple(scores_shape[start:end])
                if sizes != full:
                    target = list(mask.shape)
                    target[start:end] = full
                    mask = mask.expand(target)
                merged = [math.prod(full)]
            mask = mask.reshape(*mask.shape[:start], *merged, *mask.shape[end:])
        return mask

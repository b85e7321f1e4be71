"""What every attention kernel receives, and the convention they share.

Shape legend: B batch, T query positions, S key positions, N query heads,
K key/value heads (grouped-query attention: `N % K == 0`, query head `i` reads
key/value head `i // (N / K)`; multi-head attention is `K == N`), H query/key
head size, Hv value head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_mha.attention.masks import MaskSpec


@dataclass
class AttentionRequest:
    """One local attention computation.

    Attributes:
        q_BTNH: projected queries `(B, T, N, H)`.
        k_BSNH: projected keys `(B, S, K, H)`; K divides N (grouped-query
            attention; the fast kernels never repeat K/V to N heads).
        v_BSNH: projected values `(B, S, K, Hv)`.
        masks: the call's `MaskSpec`.
        scale: multiplier of `q @ k^T` (Keras: `1 / sqrt(key_dim)`).
        dropout_p: dropout rate on the attention probabilities (0 when not training).
        need_scores: whether the pre-dropout probabilities must be returned.
        dropout_keep: optional `fn(shape_BNTS, device) -> bool keep-mask` that
            replaces the kernel's own dropout randomness (TP-invariant mode).
        rng: optional `RNGStream` dropout draws from (the layer's per-rank
            stream); None means torch's default generator.
    """

    q_BTNH: torch.Tensor
    k_BSNH: torch.Tensor
    v_BSNH: torch.Tensor
    masks: MaskSpec
    scale: float
    dropout_p: float = 0.0
    need_scores: bool = False
    dropout_keep: object = None
    rng: object = None

    @property
    def T(self) -> int:
        return self.q_BTNH.shape[1]

    @property
    def S(self) -> int:
        return self.k_BSNH.shape[1]

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.q_BTNH.shape[2] // self.k_BSNH.shape[2]


def mask_with_live_rows(mask_BNTS: torch.Tensor):
    """Makes a mask safe for kernels that would return NaN on fully masked rows.

    Returns:
        `(safe_mask, live_BTN1)`: the mask with fully masked rows opened up
        (so the kernel computes something finite there), and a bool tensor,
        broadcastable to the output `(B, T, N, Hv)`, that is False on those rows.
        The caller zeroes the output there, which is dist_mha's convention for
        rows with nothing to attend to.
    """
    live_BNT1 = mask_BNTS.any(dim=-1, keepdim=True)
    return mask_BNTS | ~live_BNT1, live_BNT1.transpose(1, 2)


def zero_rows(out_BTNH: torch.Tensor, keep) -> torch.Tensor:
    """Zeroes output rows where `keep` (broadcastable to the output) is False."""
    if keep is None:
        return out_BTNH
    return torch.where(keep, out_BTNH, torch.zeros((), dtype=out_BTNH.dtype, device=out_BTNH.device))

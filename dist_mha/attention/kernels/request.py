"""What every attention kernel receives, and the convention they share.

Shape legend: B batch, T query positions, S key positions, N query heads,
K key/value heads (grouped-query attention: `N % K == 0`, query head `i` reads
key/value head `i // (N / K)`; multi-head attention is `K == N`), H query/key
head size, Hv value head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_mha.attention.masks import MaskSpec, live_rows


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
        softcap: `c` of logit soft-capping (Gemma2): scaled scores become
            `c * tanh(s / c)` before the masks; None: none.
        sinks: optional `(N,)` learned logit per query head (gpt-oss): it joins
            every row's softmax denominator and contributes no value.
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
    softcap: float | None = None
    sinks: torch.Tensor | None = None

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


def repeat_kv(x_BKSH: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
    """Grouped K/V `(.., K, ..)` repeated to `n` heads along `dim` (query head i reads K/V head i // (n / K))."""
    g = n // x_BKSH.shape[dim]
    return x_BKSH if g == 1 else x_BKSH.repeat_interleave(g, dim=dim)


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """`c * tanh(s / c)` (Gemma2's order: divide, tanh, multiply), or the scores themselves."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def mask_with_live_rows(mask_BNTS: torch.Tensor, T: int, is_causal: bool = False):
    """Makes a mask safe for kernels that would return NaN on fully masked rows.

    Returns:
        `(safe_mask, keep_BTN1)`: the mask with fully masked rows opened up
        (so the kernel computes something finite there), and a bool tensor,
        broadcastable to the output `(B, T, N, Hv)`, that is False on those
        rows (None when every row sees a key, checked on CPU in eager mode
        only: elsewhere reading the answer would wait for the device or
        break a compiled graph). The caller zeroes the output there, which is
        dist_mha's convention for rows with nothing to attend to.
    """
    live_BNT = live_rows(mask_BNTS, T, is_causal)
    if mask_BNTS.device.type == "cpu" and not torch.compiler.is_compiling() and bool(live_BNT.all()):
        return mask_BNTS, None
    return mask_BNTS | ~live_BNT[..., None], rows_BTN1(live_BNT)


def rows_BTN1(rows_BNT: torch.Tensor) -> torch.Tensor:
    """Per-row flags `(B|1, N|1, T|1)` -> broadcastable to an output `(B, T, N, Hv)`."""
    return rows_BNT.transpose(1, 2)[..., None]


def zero_rows(out_BTNH: torch.Tensor, keep) -> torch.Tensor:
    """Zeroes output rows where `keep` (broadcastable to the output) is False."""
    if keep is None:
        return out_BTNH
    return torch.where(keep, out_BTNH, torch.zeros((), dtype=out_BTNH.dtype, device=out_BTNH.device))

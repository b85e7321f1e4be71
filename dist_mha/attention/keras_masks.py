"""Keras's call masks, parsed into one `MaskSpec`.

Shape legend: B batch, T query positions, S key positions, N heads (see layout.py).

Keras merges `query_mask` (B, T), `value_mask`/`key_mask` (B, S), a causal
mask (1, T, S), a sliding-window band and `attention_mask` with a logical AND
into one (B, T, S) mask, then inserts missing dims until it broadcasts against
the scores. For rank-3 inputs the pieces are kept apart (see masks.py); other
ranks follow Keras's dense construction literally.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_mha.attention.blocks import positional_mask
from dist_mha.attention.layout import AttentionLayout
from dist_mha.attention.masks import MaskSpec


def _as_bool_mask(mask, name: str, expected_shape, device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        # Arrays and nested lists convert; strings, scalars and other objects are
        # mistakes (a bare True or 1 would silently broadcast to "attend everywhere").
        received = mask
        convertible = isinstance(mask, (list, tuple)) or hasattr(mask, "__array__")
        try:
            mask = torch.as_tensor(np.asarray(mask)) if convertible else None
        except Exception:
            mask = None
        if mask is None or mask.dim() == 0:
            expected = (f"a bool tensor or array of shape {tuple(expected_shape)} (the input's shape without its "
                        "feature dim)" if expected_shape is not None else
                        "a bool tensor or array broadcastable to the attention scores, e.g. (B, T, S), True to attend")
            text = repr(received) if isinstance(received, (str, int, float, bool)) else f"an object of type {type(received).__name__}"
            raise ValueError(
                f"Received an invalid value for argument `{name}`, expected {expected}. Received: {name}={text}"
                + (". For causal attention pass use_causal_mask=True." if name == "attention_mask" and isinstance(received, str) else "")
            )
    if expected_shape is not None and tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected shape "
            f"{tuple(expected_shape)} (the input's shape without its feature dim). "
            f"Received: {name}.shape={tuple(mask.shape)}"
        )
    # Keras casts masks to bool: any nonzero value keeps the position.
    return mask.to(device=device, dtype=torch.bool) if mask.dtype != torch.bool else mask.to(device)


def _expand_attention_mask(mask: torch.Tensor, layout: AttentionLayout, scores_shape) -> torch.Tensor:
    """Inserts dims where Keras inserts them, then checks broadcastability."""
    rank = len(scores_shape)
    received = tuple(mask.shape)
    if mask.dim() > rank:
        raise ValueError(
            "Received an invalid value for argument `attention_mask`, expected at most "
            f"{rank} dims, broadcastable to the attention scores of shape "
            f"{tuple(scores_shape)}. Received: attention_mask.shape={tuple(mask.shape)}"
        )
    # Keras expands starting from the heads dim: (<batch dims>, N, <T dims>, <S dims>).
    axis = -2 * len(layout.attention_axes) - 1
    while mask.dim() < rank:
        # Masks too small for Keras's insertion point (Keras raises there) get
        # plain numpy-style leading dims instead.
        mask = mask.unsqueeze(axis if axis >= -(mask.dim() + 1) else 0)
    for got, want in zip(mask.shape, scores_shape):
        if got != 1 and got != want:
            raise ValueError(
                "Received an invalid value for argument `attention_mask`: its shape does "
                f"not broadcast to the attention scores {tuple(scores_shape)} after Keras's "
                f"dim insertion (got {tuple(mask.shape)}). Pass a mask of shape (B, T, S) "
                "for rank-3 inputs, or one broadcastable to the scores. Received: "
                f"attention_mask.shape={received}"
            )
    return mask


def build_mask_spec(
    layout: AttentionLayout,
    query_shape,
    value_shape,
    scores_shape,
    *,
    query_mask=None,
    value_mask=None,
    key_mask=None,
    attention_mask=None,
    use_causal_mask: bool = False,
    sliding_window: int | None = None,
    device=None,
) -> MaskSpec:
    """Turns Keras call masks into a `MaskSpec` for the kernels.

    Args:
        layout: the call's `AttentionLayout`.
        query_shape: shape of the query input `(B, ..., Dq)`.
        value_shape: shape of the value input `(B, ..., Dv)`.
        scores_shape: Keras scores shape `(<batch dims>, N, <T dims>, <S dims>)`.
        query_mask, value_mask, key_mask, attention_mask, use_causal_mask: as
            in `MultiHeadAttention.__call__`.
        sliding_window: the layer's `sliding_window`.
        device: device of the inputs.

    Returns:
        A `MaskSpec`.

    Raises:
        ValueError: if a mask has the wrong shape or cannot broadcast.
    """
    q_keep = None if query_mask is None else _as_bool_mask(query_mask, "query_mask", query_shape[:-1], device)
    v_keep = None if value_mask is None else _as_bool_mask(value_mask, "value_mask", value_shape[:-1], device)
    k_keep = None if key_mask is None else _as_bool_mask(key_mask, "key_mask", value_shape[:-1], device)
    dense = None if attention_mask is None else _as_bool_mask(attention_mask, "attention_mask", None, device)
    if dense is not None:
        dense = _expand_attention_mask(dense, layout, scores_shape)
    kv_keep = v_keep if k_keep is None else (k_keep if v_keep is None else v_keep & k_keep)

    if layout.is_identity:
        return MaskSpec(q_keep, kv_keep, dense, bool(use_causal_mask), sliding_window)

    only_causal = use_causal_mask and q_keep is None and kv_keep is None and dense is None and sliding_window is None
    if only_causal and layout.attention_axes == (1,):
        # Keras's (1, T, S) causal mask lines up with the flattened T and S only here.
        return MaskSpec(causal=True)

    # Keras's dense construction, literally: (B, d.., 1) & (B, 1, d..) & (1, T1, S1) ...
    parts = []
    if q_keep is not None:
        parts.append(q_keep.unsqueeze(-1))
    if kv_keep is not None:
        parts.append(kv_keep.unsqueeze(-2))
    if use_causal_mask or sliding_window is not None:
        parts.append(positional_mask(query_shape[1], value_shape[1], use_causal_mask, sliding_window, device)[None])
    auto = None
    if parts:
        try:
            auto = parts[0]
            for part in parts[1:]:
                auto = auto & part
            auto = _expand_attention_mask(auto, layout, scores_shape)
        except (ValueError, RuntimeError) as err:
            raise ValueError(
                "The query/value/key masks and causal mask of this call do not broadcast to "
                f"the attention scores {tuple(scores_shape)} (Keras builds them as "
                "(B, ..., T, 1) & (B, ..., 1, S) & (1, T, S) over the inputs' dim 1). "
                f"Check the mask shapes against attention_axes={layout.attention_axes}."
            ) from err
        dense = auto if dense is None else dense & auto
    if dense is None:
        return MaskSpec()
    return MaskSpec(dense_BNTS=layout.mask_to_BNTS(dense, scores_shape))

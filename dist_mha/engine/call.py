"""One call of the engine, before and around the kernel: checks, masks, and rows worth projecting.

Shape legend: B batch, T/S query/key positions (global under context
parallelism), N query heads, E features, R the rows that matter.

`validate` checks every argument on this rank and starts the cross-rank
agreement check (so a rank's local error reaches its peers before any
collective). `masks` turns Keras's masks, causal, window and segment ids into
one `MaskSpec` in global positions. `valid_rows` finds the tokens a
self-attention call can skip entirely: with query and key padding saying the
same thing, a padded token is never attended and its own context is zero, so
its projections are wasted work (its output is the output bias, which the
caller writes without computing anything).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_mha.attention import segments
from dist_mha.attention.masks import build_mask_spec
from dist_mha.engine import config as cfg
from dist_mha.engine import inputs
from dist_mha.parallel.cp import layout as cp_layout


@dataclass
class Call:
    query: torch.Tensor
    value: torch.Tensor
    key: torch.Tensor
    return_scores: bool
    causal: bool
    dropout_p: float
    pending: object  # the rank-agreement check in flight, or None


def validate(layer, query, value, key, masks_and_ids, return_scores, training, causal, cache) -> Call:
    """Checks this call's arguments; starts the agreement check under TP/CP (its error raised on every rank)."""
    agree = bool(layer._check_groups) and layer.check_ranks
    try:
        query, value, key = inputs.check_inputs(layer, query, value, key)
        return_scores = cfg.boolean("return_attention_scores", return_scores)
        causal = cfg.boolean("use_causal_mask", causal)
        if training is not None:
            training = cfg.boolean("training", training)
        if cache is not None:
            inputs.check_cache_call(layer, cache, query, value, causal)
        if layer.cp_size > 1:
            cp_layout.check_cp_call(layer, query, value, return_scores, cache)
        local_error = None
    except ValueError as err:
        if not agree:
            raise
        local_error = err  # every rank of the groups must hear of it before any collective
    training = layer.training if training is None else training
    dropout_p = layer._dropout if training else 0.0
    pending = None
    if agree:
        pending = inputs.check_tp_call(layer, query, value, key, masks_and_ids, return_scores, causal, dropout_p > 0,
                                       -1 if cache is None else cache.length, local_error,
                                       wait=torch.compiler.is_compiling())  # compiled: one break, here
    return Call(query, value, key, return_scores, causal, dropout_p, pending)


def masks(layer, layout, query, value, key, query_mask, value_mask, key_mask, attention_mask, causal, segment_ids,
          cache):
    """`(MaskSpec, T dims, S dims)` for the entered inputs, in global positions (CP and cached positions included)."""
    batch = [query.shape[d] for d in layout.batch_dims]
    grow = layer.cp_size if layer.cp_size > 1 else 1
    t_dims = [query.shape[d] * grow for d in layout.attention_axes]
    s_dims = [key.shape[d] * grow + (0 if cache is None else cache.length) for d in layout.attention_axes]
    q_shape, v_shape = list(query.shape), list(value.shape)
    q_shape[1], v_shape[1] = q_shape[1] * grow, v_shape[1] * grow
    spec = build_mask_spec(
        layout, q_shape, v_shape, (*batch, layer._num_heads, *t_dims, *s_dims),
        query_mask=query_mask, value_mask=value_mask, key_mask=key_mask, attention_mask=attention_mask,
        use_causal_mask=causal, sliding_window=layer._sliding_window, device=query.device,
    )
    if segment_ids is not None:
        if cache is not None:
            raise ValueError("`segment_ids` and `cache` cannot be combined: decode one document per cache row.")
        spec.q_seg_BT, spec.k_seg_BS = segments.parse_segment_ids(
            segment_ids, q_shape, v_shape, value is query, query.device)
    return spec, t_dims, s_dims


# A gather and a scatter per projected tensor cost memory traffic; below this share of
# padding they cost more than the GEMM rows they save (B=8 T=2048 E=256 on 2 CPU cores).
MIN_PADDING = 0.1


def valid_rows(layer, spec, query, value, key, call: Call, cache) -> torch.Tensor | None:
    """Flat indices `(R,)` into `B*T` of the tokens to project, or None to project them all.

    Only for rank-3 self-attention whose query padding (`query_mask`, negative
    segment ids) and key padding (`value_mask`/`key_mask`, negative ids) are
    the same tokens, on CPU in eager mode (reading the mask is free there),
    without sequence/context parallelism, a cache, returned scores or an
    activity regularizer (which Keras applies to every position's projection).
    """
    if query.device.type != "cpu" or torch.compiler.is_compiling() or query.dim() != 3:
        return None
    if not (value is query and key is query) or call.return_scores or cache is not None:
        return None
    if layer.sequence_parallel or layer.cp_size > 1 or layer._activity_regularizer is not None:
        return None
    q_ok, k_ok = spec.q_keep_BT, spec.k_keep_BS
    if spec.q_seg_BT is not None:
        q_ok = spec.q_seg_BT >= 0 if q_ok is None else q_ok & (spec.q_seg_BT >= 0)
        k_ok = spec.k_seg_BS >= 0 if k_ok is None else k_ok & (spec.k_seg_BS >= 0)
    if q_ok is None or k_ok is None or q_ok.shape != k_ok.shape or not torch.equal(q_ok, k_ok):
        return None
    flat = q_ok.reshape(-1)
    kept = int(flat.sum())
    if kept > (1.0 - MIN_PADDING) * flat.numel():
        return None
    return flat.nonzero().squeeze(1)


def scatter_rows(x_R, rows, total: int) -> torch.Tensor:
    """`(R, *rest)` -> `(total, *rest)`: zeros outside `rows` (differentiable)."""
    return x_R.new_zeros((total, *x_R.shape[1:])).index_copy(0, rows, x_R)

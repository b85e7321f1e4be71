"""Self-attention on a padded batch projects only the tokens anyone attends to.

Shape legend: B batch, T positions, E features, R the rows that matter.

With query and key padding saying the same thing, a padded token is never
attended and its own context is zero, so its projections are wasted work
(its output is the output bias, which the caller writes without computing
anything). `valid_rows` finds the tokens to keep; `scatter_rows` puts the
projected rows back in place.
"""

from __future__ import annotations

import torch

# A gather and a scatter per projected tensor cost memory traffic; below this share of
# padding they cost more than the GEMM rows they save (B=8 T=2048 E=256 on 2 CPU cores).
MIN_PADDING = 0.1


def valid_rows(layer, c) -> torch.Tensor | None:
    """Flat indices `(R,)` into `B*T` of the tokens to project, or None to project them all.

    Only for rank-3 self-attention whose query padding (`query_mask`, negative
    segment ids) and key padding (`value_mask`/`key_mask`, negative ids) are
    the same tokens, on CPU in eager mode (reading the mask is free there),
    without sequence/context parallelism, a cache, returned scores or an
    activity regularizer (which Keras applies to every position's projection).
    """
    query, spec = c.query, c.masks
    if query.device.type != "cpu" or torch.compiler.is_compiling() or query.dim() != 3:
        return None
    if not (c.value is query and c.key is query) or c.return_scores or c.cache is not None:
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


def scatter_rows(x_R, rows, lead: torch.Size) -> torch.Tensor:
    """`(R, *rest)` -> `(*lead, *rest)`: zeros outside `rows` (differentiable)."""
    full = x_R.new_zeros((lead.numel(), *x_R.shape[1:])).index_copy(0, rows, x_R)
    return full.view(*lead, *x_R.shape[1:])

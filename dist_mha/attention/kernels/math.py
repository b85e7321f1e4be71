"""Exact attention: explicit scores, masked softmax, dropout, weighted sum.

Shape legend: B batch, T query positions, S key positions, N query heads,
K key/value heads, H head size, Hv value head size.

The reference every other backend is tested against, and the only one that
returns the attention probabilities. It materialises `(B, N, T, S)`, and for
grouped-query attention repeats K/V to N heads (as Keras does).
"""

from __future__ import annotations

import torch

from dist_mha.attention.kernels.request import AttentionRequest, repeat_kv, softcapped
from dist_mha.rng.streams import dropout

NAME = "math"


def refusals(req: AttentionRequest) -> list[str]:
    """The math path takes every input."""
    return []


def run(req: AttentionRequest):
    """Returns `(out_BTNH, probs_BNTS or None)`."""
    q_BNTH = req.q_BTNH.transpose(1, 2)
    k_BKSH = req.k_BSNH.transpose(1, 2)
    v_BKSH = req.v_BSNH.transpose(1, 2)
    n = q_BNTH.shape[1]
    k_BNSH, v_BNSH = repeat_kv(k_BKSH, n), repeat_kv(v_BKSH, n)
    # Keras scales the query before the product; same order, same rounding.
    scores_BNTS = softcapped(torch.matmul(q_BNTH * req.scale, k_BNSH.transpose(-1, -2)), req.softcap)
    mask = req.masks.combined(req.T, req.S, scores_BNTS.device)
    if mask is not None:
        scores_BNTS = scores_BNTS.masked_fill(~mask, torch.finfo(scores_BNTS.dtype).min)
    if req.sinks is not None:
        # A sink is one more logit per row (per head) whose value is zero: softmax over both, keep the keys'.
        sink = req.sinks.to(scores_BNTS.dtype).view(1, -1, 1, 1).expand(*scores_BNTS.shape[:-1], 1)
        scores_BNTS = torch.cat([scores_BNTS, sink], dim=-1)
    if scores_BNTS.dtype in (torch.float16, torch.bfloat16):
        probs_BNTS = torch.softmax(scores_BNTS, dim=-1, dtype=torch.float32).to(scores_BNTS.dtype)
    else:
        probs_BNTS = torch.softmax(scores_BNTS, dim=-1)
    if req.sinks is not None:
        probs_BNTS = probs_BNTS[..., :-1]
    if mask is not None:
        # Masked entries are already exactly 0 (exp underflow); this only
        # zeroes rows where every key is masked, which softmax made uniform.
        probs_BNTS = probs_BNTS * mask
    if req.dropout_p > 0 and req.dropout_keep is not None:
        keep = req.dropout_keep(probs_BNTS.shape, probs_BNTS.device)
        dropped = probs_BNTS * keep / (1.0 - req.dropout_p)
    elif req.dropout_p > 0:
        dropped = dropout(probs_BNTS, req.dropout_p, req.rng)
    else:
        dropped = probs_BNTS
    out_BNTH = torch.matmul(dropped, v_BNSH)
    return out_BNTH.transpose(1, 2), (probs_BNTS if req.need_scores else None)

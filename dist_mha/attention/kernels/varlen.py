"""Ragged batches at the cost of their valid tokens: attention per sequence.

Shape legend: B batch, T query positions, S key positions, N query heads, K
key/value heads, H / Hv head sizes; a "sequence" is a query range of one row
with the keys it may see.

Key padding, query padding and packed documents (`segment_ids`) make a batch
a set of independent sequences. This backend finds them from the masks and
runs torch SDPA once per sequence on just its rows: a row padded to half its
length costs a quarter of a full row's attention, a packed row costs the sum
of its documents' squares, and no `(T, S)` mask is built except a window's
band. Three decompositions, tried in order:

1. segment ids: every document (a run of one id >= 0 in the query ids and
   the same id's run in the key ids) is a sequence; key padding may trim a
   run at its ends (it must stay contiguous);
2. key padding whose valid keys form one contiguous range per row (right,
   left or both-sided padding): one sequence per row over that range, causal
   and window masks keep their global positions through an offset;
3. key padding alone (no causal/window): one sequence per row over its valid
   keys, gathered (any pattern).

Query padding zeroes output rows, as everywhere. The plan is read from the
masks on the host: free on CPU; on CUDA one synchronisation per distinct
mask, since plans are cached by the mask tensors' identity and version
(`mask_cache`), so the layers of one forward pass share one read, and the
gathered-key index tensors are built once per plan. Under torch.compile the
read would break the graph, and inside a CUDA-graph capture the plan would
be replayed stale for other masks: both are refused. An attention_mask,
returned scores or TP-invariant dropout need the dense paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_mha.attention.blocks import CAUSAL, relation
from dist_mha.attention.kernels import flash, mask_cache
from dist_mha.attention.kernels.request import AttentionRequest, zero_rows
from dist_mha.rng.streams import forked

NAME = "varlen"


@dataclass(frozen=True, eq=False)
class Sequence:
    """Query rows `[q0, q1)` of batch row `b` against keys `[k0, k1)` (or the gathered `keys`)."""

    b: int
    q0: int
    q1: int
    k0: int
    k1: int
    keys: torch.Tensor | None = None  # explicit key indices on the inputs' device (pattern 3), made once per plan


def _runs(row: list[int]) -> dict[int, tuple[int, int]] | None:
    """`{id: (start, stop)}` of the non-negative ids of one row; None if an id is not one contiguous run."""
    runs, prev = {}, None
    for i, x in enumerate(row):
        if x < 0:
            prev = x
            continue
        if x != prev:
            if x in runs:
                return None
            runs[x] = [i, i + 1]
        else:
            runs[x][1] = i + 1
        prev = x
    return {k: tuple(v) for k, v in runs.items()}


def _range(keep: list[bool]) -> tuple[int, int] | None:
    """`(start, stop)` when the True entries are one contiguous range (None if not; (0, 0) if none)."""
    idx = [i for i, k in enumerate(keep) if k]
    if not idx:
        return 0, 0
    return (idx[0], idx[-1] + 1) if idx[-1] - idx[0] + 1 == len(idx) else None


def plan(req: AttentionRequest) -> tuple[list[Sequence] | None, str]:
    """The sequences of `req`, or `(None, why not)`; cached on `req` and by the masks' identity."""
    cached = getattr(req, "_varlen_plan", None)
    if cached is not None:
        return cached
    m = req.masks
    extra = (m.dense_BNTS is None, req.q_BTNH.shape[0], req.T, req.S, m.causal, m.window, m.q_offset,
             str(req.q_BTNH.device))
    result = mask_cache.cached("varlen", (m.q_keep_BT, m.k_keep_BS, m.q_seg_BT, m.k_seg_BS), extra,
                               lambda: _plan(req))
    req._varlen_plan = result
    return result


def _plan(req):
    m = req.masks
    if m.dense_BNTS is not None:
        return None, "an attention_mask (or a non-rank-3 layout) needs a dense mask"
    if m.q_seg_BT is None and m.k_keep_BS is None:
        return None, "no key padding or segment ids: nothing to skip (SDPA serves the whole batch)"
    if m.q_offset:
        return None, "a query offset (KV cache) is served by SDPA"
    B, T, S = req.q_BTNH.shape[0], req.T, req.S
    keep = m.k_keep_BS.tolist() if m.k_keep_BS is not None else [[True] * S] * B
    seqs = []
    if m.q_seg_BT is not None:
        q_ids, k_ids = m.q_seg_BT.tolist(), m.k_seg_BS.tolist()
        for b in range(B):
            q_runs, k_runs = _runs(q_ids[b]), _runs(k_ids[b])
            if q_runs is None or k_runs is None:
                return None, "a document id occurs in more than one run of a row (documents must be contiguous)"
            for doc, (q0, q1) in q_runs.items():
                if doc not in k_runs:
                    continue  # no key of this document: zero context
                k0, k1 = k_runs[doc]
                span = _range(keep[b][k0:k1])
                if span is None:
                    return None, "key padding inside a document (its valid keys are not contiguous)"
                if span[1] > span[0]:
                    seqs.append(Sequence(b, q0, q1, k0 + span[0], k0 + span[1]))
        return seqs, "segments"
    # Query rows: the valid range of a contiguous query mask (padded queries are zeroed anyway).
    q_spans = [(0, T)] * B
    if m.q_keep_BT is not None:
        q_spans = [_range(row) or (0, T) for row in m.q_keep_BT.tolist()]
    spans = [_range(row) for row in keep]
    if all(s is not None for s in spans):
        return [Sequence(b, q0, q1, k0, k1) for b, ((k0, k1), (q0, q1)) in enumerate(zip(spans, q_spans))
                if k1 > k0 and q1 > q0], "contiguous padding"
    if m.causal or m.window is not None:
        return None, "causal/window with non-contiguous key padding would shift positions"
    device = req.q_BTNH.device
    return [Sequence(b, q0, q1, 0, S, torch.tensor([i for i, k in enumerate(row) if k], device=device))
            for b, (row, (q0, q1)) in enumerate(zip(keep, q_spans)) if any(row) and q1 > q0], "gathered keys"


# When the dispatcher picks this backend by itself. Each sequence is one SDPA call plus the
# slicing and concatenation around it; the dense alternative computes every (query, key) pair,
# since its mask tensor rules out SDPA's causal fast path. Measured fwd+bwd on 2 CPU cores
# (bench/README.md, "varlen dispatch rule"): varlen wins once each call saves about 300k
# (query, key, head) products, e.g. B=8 rows half padded at T=512, causal at T=256; it loses
# at T <= 128 and when under ~15% of the pairs are saved.
MIN_SAVED_PER_CALL = 300_000


def _pairs(seq: Sequence, causal: bool) -> int:
    lq = seq.q1 - seq.q0
    lk = seq.keys.numel() if seq.keys is not None else seq.k1 - seq.k0
    if not causal:
        return lq * lk
    # Query i sees min(lk, max(0, i + a)) keys, a = offset + 1: zeros, a ramp, then full rows.
    a = (seq.q0 - seq.k0 if seq.keys is None else 0) + 1
    start = min(lq, max(0, -a))
    ramp_end = min(lq, max(start, lk - a))
    ramp = (ramp_end - start) * (2 * a + start + ramp_end - 1) // 2
    return ramp + (lq - ramp_end) * lk


def worthwhile(req: AttentionRequest) -> tuple[bool, str]:
    """Whether running the plan beats one dense SDPA call: `(yes, why not)`."""
    seqs, _ = plan(req)
    B, N = req.q_BTNH.shape[0], req.q_BTNH.shape[2]
    saved = (B * req.T * req.S - sum(_pairs(s, req.masks.causal) for s in seqs)) * N
    per_call = saved / max(len(seqs), 1)
    if per_call < MIN_SAVED_PER_CALL:
        return False, (f"it would save {per_call:,.0f} (query, key, head) products per sequence call, fewer than the "
                       f"{MIN_SAVED_PER_CALL:,} a call costs (force attention_backend='varlen' to use it anyway)")
    return True, ""


def refusals(req: AttentionRequest) -> list[str]:
    """Why this backend cannot serve `req` (empty when it can)."""
    reasons = []
    if torch.compiler.is_compiling():
        reasons.append("under torch.compile the plan (read from mask values) would break the graph")
    if flash.capturing():
        reasons.append("inside a CUDA-graph capture the plan (read from mask values) would be replayed stale")
    if req.need_scores:
        reasons.append("it does not return attention probabilities (return_attention_scores=True)")
    if req.dropout_p > 0 and req.dropout_keep is not None:
        reasons.append("TP-invariant dropout needs explicit masks, which only the math path applies")
    if req.softcap is not None or req.sinks is not None:
        reasons.append("logit_softcap and attention sinks change the softmax of every sequence call "
                       "(SDPA serves sinks, the math path both)")
    if not reasons:
        seqs, why = plan(req)
        if seqs is None:
            reasons.append(why)
    return reasons


def _attend(q_1TNH, k_1SKH, v_1SKH, req, seq):
    """SDPA on one sequence; query i sits at key position `i + q0 - k0` for causal/window."""
    m = req.masks
    T, S = q_1TNH.shape[1], k_1SKH.shape[1]
    offset = seq.q0 - seq.k0 if seq.keys is None else 0
    rel = relation(offset, offset + T, 0, S, m.causal, m.window)
    is_causal = rel.kind == CAUSAL
    mask = None if is_causal else rel.mask(q_1TNH.device)
    gqa = {"enable_gqa": True} if req.groups > 1 else {}
    out = F.scaled_dot_product_attention(
        q_1TNH.transpose(1, 2), k_1SKH.transpose(1, 2), v_1SKH.transpose(1, 2), attn_mask=mask,
        dropout_p=req.dropout_p, is_causal=is_causal, scale=req.scale, **gqa)
    out = out.transpose(1, 2)
    lo, hi = rel.live_rows()
    if (lo, hi) != (0, T):
        # Rows the window or an offset leaves without a key: zero context (SDPA would give NaN or a mean).
        out = torch.cat([out.new_zeros(1, lo, *out.shape[2:]), out[:, lo:hi], out.new_zeros(1, T - hi, *out.shape[2:])], 1)
    return out


def run(req: AttentionRequest):
    """Returns `(out_BTNH, None)`."""
    seqs, _ = plan(req)
    q, k, v = req.q_BTNH, req.k_BSNH, req.v_BSNH
    B, T, N = q.shape[:3]
    Hv = v.shape[-1]
    rows = [[] for _ in range(B)]  # per batch row: (q0, q1, out)
    with forked(req):  # SDPA's dropout draws from the layer's RNG stream
        for seq in seqs:
            b = seq.b
            if seq.keys is None:
                k_s, v_s = k[b:b + 1, seq.k0:seq.k1], v[b:b + 1, seq.k0:seq.k1]
            else:
                k_s, v_s = k[b:b + 1].index_select(1, seq.keys), v[b:b + 1].index_select(1, seq.keys)
            rows[b].append((seq.q0, seq.q1, _attend(q[b:b + 1, seq.q0:seq.q1], k_s, v_s, req, seq)))
    out_rows = []
    for b in range(B):
        pieces, pos = [], 0
        for q0, q1, out in sorted(rows[b], key=lambda r: r[0]):
            if q0 > pos:
                pieces.append(q.new_zeros(1, q0 - pos, N, Hv))
            pieces.append(out.to(q.dtype))
            pos = q1
        if pos < T:
            pieces.append(q.new_zeros(1, T - pos, N, Hv))
        out_rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    out = torch.cat(out_rows, dim=0)
    if req.masks.q_keep_BT is not None:
        out = zero_rows(out, req.masks.q_keep_BT[:, :, None, None])
    return out, None

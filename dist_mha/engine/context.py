"""The engine's attention step under context parallelism (ring or Ulysses).

Shape legend: B batch, T/S global query/key lengths, t/s this rank's rows, n/k
this rank's query/key-value heads (after tensor parallelism), p the CP size.

The engine projects this rank's rows for this rank's heads as usual; this
module replaces the single local kernel call with the CP algorithm, keeping
Keras's masks in global positions (query padding zeroes rows at the end, as
the local kernels do). Dropout: Ulysses runs the local kernel's dropout on
its n/p heads (a stream per TP x CP rank, or TP-invariant masks); ring
blocks draw counter-based keep-masks keyed by global (batch, head, query,
key) positions, so the backward sees the forward's masks without storing
them, and with `dropout_mode="tp_invariant"` the result equals one device's.
"""

from __future__ import annotations

from dist_mha.attention.kernels import AttentionRequest, attention, blockwise
from dist_mha.attention.kernels.request import zero_rows
from dist_mha.attention.masks import MaskSpec
from dist_mha.parallel.cp import ring, ulysses
from dist_mha.parallel.cp.layout import positions
from dist_mha.rng.streams import invariant_keep_mask


def attend(layer, req: AttentionRequest, h0: int, h1: int, T: int, S: int):
    """`(out_BtNH, backend, why)` for this rank's queries over the whole sequence."""
    if layer.cp_mode == "ring":
        return _ring(layer, req, h0, h1, T, S)
    return _ulysses(layer, req, h0, h1, T, S)


def _dropout_seed_and_call(layer):
    counter = layer._invariant_calls
    call = counter.next()
    if layer.dropout_mode == "tp_invariant" or layer._dropout_stream is None:
        return counter.seed, call
    return layer._dropout_stream.seed, call  # per TP rank, keyed by global positions across the CP group


def _ring(layer, req, h0, h1, T, S):
    q, k, v, m = req.q_BTNH, req.k_BSNH, req.v_BSNH, req.masks
    impl, why = blockwise.choose(q.transpose(1, 2), v, req.dropout_p > 0, layer._attention_backend)
    forced = layer._attention_backend
    refused = forced in ("flash", "varlen") or (forced == "sdpa" and impl == "math")
    if layer._flash_attention is True or refused:
        wanted = "flash_attention=True" if layer._flash_attention is True else f"attention_backend={forced!r}"
        raise ValueError(
            f"{wanted} cannot serve ring context parallelism. Why: flash: ring blocks need a backward that takes "
            "the merged log-sum-exp, which dist_mha drives for torch's kernels only; varlen: its per-sequence plan "
            f"does not split into ring blocks; sdpa: {why}; math: ok. Use cp_mode='ulysses' (any local kernel) or "
            "let dist_mha choose (attention_backend=None)."
        )
    keep_fn, rate = None, req.dropout_p
    if rate > 0:
        seed, call = _dropout_seed_and_call(layer)
        B, N = q.shape[0], layer._num_heads

        def keep_fn(a0, a1, c0, c1):
            index = (slice(None), slice(h0, h1), slice(a0, a1), slice(c0, c1))
            return invariant_keep_mask(seed, call, (B, N, T, S), index, rate, q.device)

    plan = ring.RingPlan(layer.cp_group, T, S, req.scale, impl, m.k_keep_BS, m.dense_BNTS, m.causal, m.window,
                         m.q_seg_BT, m.k_seg_BS, keep_fn, rate)
    out = ring.ring_attention(q, k, v, plan)
    layer.__dict__["last_ring_blocks"] = (plan.blocks, plan.skipped)  # computed, skipped (causal/window)
    if m.q_keep_BT is not None:
        rows = m.q_keep_BT.index_select(1, positions(T, layer.cp_group, q.device))
        out = zero_rows(out, rows[:, :, None, None])
    return out, "ring", why


def _ulysses(layer, req, h0, h1, T, S):
    group, p, r = layer.cp_group, layer.cp_size, layer.cp_rank
    q, k, v, m = req.q_BTNH, req.k_BSNH, req.v_BSNH, req.masks
    n = q.shape[2]
    (to_nat_q, to_g_q), (to_nat_k, _) = ulysses.orders(T, S, group, q.device)
    q_full = ulysses.scatter_heads(q, group, to_nat_q)  # (B, T, n/p, H)
    k_full = ulysses.kv_heads(k, group, to_nat_k, n)
    v_full = ulysses.kv_heads(v, group, to_nat_k, n)
    c0, c1 = r * (n // p), (r + 1) * (n // p)
    dense = m.dense_BNTS
    if dense is not None and dense.shape[1] == n != c1 - c0:
        dense = dense[:, c0:c1]  # a per-head mask: this rank's heads
    masks = MaskSpec(m.q_keep_BT, m.k_keep_BS, dense, m.causal, m.window, 0, m.q_seg_BT, m.k_seg_BS)
    local = AttentionRequest(q_full, k_full, v_full, masks, req.scale, req.dropout_p, False)
    if req.dropout_p > 0 and layer.dropout_mode == "tp_invariant":
        local.dropout_keep = _heads_keep(layer, req, h0 + c0, h0 + c1, T, S)
    out_full, _, backend, why = attention(local, layer._flash_attention, layer._attention_backend)
    return ulysses.gather_heads(out_full, group, to_g_q), backend, f"ulysses ({n // p} heads per rank): {why}"


def _heads_keep(layer, req, g0, g1, T, S):
    """TP-invariant keep-masks for global heads [g0, g1) over the whole sequence."""
    seed, call = layer._invariant_calls.seed, layer._invariant_calls.next()
    rate, N = req.dropout_p, layer._num_heads

    def keep(shape_BNTS, device):
        return invariant_keep_mask(seed, call, (shape_BNTS[0], N, T, S), (slice(None), slice(g0, g1)), rate, device)

    return keep

"""The engine's attention step under context parallelism: ring or Ulysses, given dist_mha's kernels.

Shape legend: B batch, T/S global query/key lengths, t/s this rank's rows, n/k
this rank's query/key-value heads (after tensor parallelism), p the CP size.

The engine projects this rank's rows for this rank's heads as usual; this
module replaces the single local kernel call with the CP algorithm, keeping
Keras's masks in global positions (query padding zeroes rows at the end, as
the local kernels do). It is where the CP algorithms (`dist_mha.parallel.cp`,
which move tensors and compute nothing) meet the kernels and masks
(`dist_mha.attention`): the ring gets the blockwise kernels and a mask
slicer, Ulysses gets the ordinary dispatcher. Dropout: Ulysses runs the
local kernel's dropout on its n/p heads (a stream per TP x CP rank, or
TP-invariant masks); ring blocks draw counter-based keep-masks keyed by
global (batch, head, query, key) positions, so the backward sees the
forward's masks without storing them, and with `dropout_mode="tp_invariant"`
the result equals one device's.
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

from dist_mha.attention.blocks import CAUSAL, EMPTY
from dist_mha.attention.kernels import AttentionRequest, attention, blockwise
from dist_mha.attention.kernels.request import zero_rows
from dist_mha.attention.masks import MaskSpec
from dist_mha.parallel.cp import ring, ulysses
from dist_mha.parallel.cp.layout import positions
from dist_mha.rng.invariant import InvariantKeep

# Ring blocks whose masks vary along the queries (packed documents, an attention_mask) and math
# blocks (five (B, n, t, s) float32 temporaries) are cut into query tiles that keep one block's
# transient memory near this budget, so per-rank memory grows with T/cp, not (T/cp)^2.
RING_TILE_BYTES = 64 * 2**20
RING_MIN_TILE = 16  # rows: below this a tile's kernel launches cost more than its memory saves


def attend(layer, req: AttentionRequest, h0: int, h1: int, T: int, S: int):
    """`(out_BtNH, backend, why)` for this rank's queries over the whole sequence."""
    if layer.cp_mode == "ring":
        return _ring(layer, req, h0, h1, T, S)
    per_rank = req.dropout_p > 0 and layer.dropout_mode == "per_rank"
    stream = layer._dropout_stream if per_rank else None
    with stream.fork(req.q_BTNH.device) if stream is not None else nullcontext():
        return _ulysses(layer, req, h0, h1, T, S)


def _tile(kernels, m: MaskSpec, B: int, n: int, t: int, s: int) -> int | None:
    """Query rows per ring block (None: whole chunks)."""
    varies = m.q_seg_BT is not None or (m.dense_BNTS is not None and m.dense_BNTS.shape[-2] > 1)
    math_blocks = "math" in (kernels.unmasked, kernels.masked)
    if not (varies or math_blocks):
        return None
    per_row = (5 * 4 * n if math_blocks else 5) * B * s  # bytes of one query row's block temporaries
    return max(RING_MIN_TILE, RING_TILE_BYTES // max(per_row, 1)) if per_row * t > RING_TILE_BYTES else None


def _ring(layer, req, h0, h1, T, S):
    q, k, v, m = req.q_BTNH, req.k_BSNH, req.v_BSNH, req.masks
    kernels = blockwise.choose(q.transpose(1, 2), v, req.dropout_p > 0, layer._attention_backend,
                               layer._flash_attention, req.softcap)
    forced = layer._attention_backend
    refused = forced in ("flash", "varlen") or (forced == "sdpa" and "math" in (kernels.unmasked, kernels.masked))
    if layer._flash_attention is True or refused:
        wanted = "flash_attention=True" if layer._flash_attention is True else f"attention_backend={forced!r}"
        raise ValueError(
            f"{wanted} cannot serve ring context parallelism. Why: flash: ring blocks need a backward that takes "
            "the merged log-sum-exp, which dist_mha drives for torch's kernels only; varlen: its per-sequence plan "
            f"does not split into ring blocks; sdpa: {kernels.why}; math: ok. Use cp_mode='ulysses' (any local "
            "kernel) or let dist_mha choose (attention_backend=None)."
        )
    B, device, rate = q.shape[0], q.device, req.dropout_p
    keep = None
    if rate > 0:
        keep = InvariantKeep(layer._invariant_calls, layer._num_heads, T, S, h0, h1, rate)
        if layer.dropout_mode != "tp_invariant" and layer._dropout_stream is not None:
            keep.seed = layer._dropout_stream.seed  # per TP rank, keyed by global positions across the CP group

    def block(a, c):
        rel, mask = m.block(a, c, device)
        if rel.kind == EMPTY:
            return True, None, None, False
        return False, mask, None if keep is None else keep.block(a, c, B, device), rel.kind == CAUSAL

    kernel = SimpleNamespace(
        forward=lambda q_, k_, v_, mask, kp, causal, state: blockwise.forward(
            kernels, q_, k_, v_, mask, req.scale, kp, rate, causal, state, req.softcap),
        backward=lambda dO, q_, k_, v_, O, L, D, mask, kp, causal, state: blockwise.backward(
            kernels, dO, q_, k_, v_, O, L, D, mask, req.scale, kp, rate, causal, state, req.softcap),
        merge=blockwise.merge, lse_dtype=blockwise.lse_dtype, add_sinks=blockwise.add_sinks,
        sinks_grad=blockwise.sinks_grad)
    t, s = q.shape[1], k.shape[1]
    plan = ring.RingPlan(layer.cp_group, T, S, kernel, block, _tile(kernels, m, B, q.shape[2], t // 2, s // 2))
    out = ring.ring_attention(q, k, v, plan, req.sinks)
    layer.__dict__["last_ring_blocks"] = (plan.blocks, plan.skipped)  # computed, skipped (causal/window)
    if m.q_keep_BT is not None:
        rows = m.q_keep_BT.index_select(1, positions(T, layer.cp_group, device))
        out = zero_rows(out, rows[:, :, None, None])
    return out, "ring", kernels.why


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
    local = AttentionRequest(q_full, k_full, v_full, masks, req.scale, req.dropout_p, False, softcap=req.softcap,
                             sinks=None if req.sinks is None else req.sinks[c0:c1])
    if req.dropout_p > 0 and layer.dropout_mode == "tp_invariant":
        local.dropout_keep = InvariantKeep(layer._invariant_calls, layer._num_heads, T, S, h0 + c0, h0 + c1,
                                           req.dropout_p)
    out_full, _, backend, why = attention(local, layer._flash_attention, layer._attention_backend)
    return ulysses.gather_heads(out_full, group, to_g_q), backend, f"ulysses ({n // p} heads per rank): {why}"

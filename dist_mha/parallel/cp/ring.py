"""Ring attention: exact attention over a sequence split across the CP group.

Shape legend: B batch, T/S global query/key lengths, t/s this rank's rows
(two chunks of t/2, s/2; see context.py), n/k this rank's query/key-value
heads, H/Hv head sizes; `*_BNTH` tensors put heads before positions.

Forward: p steps. At step i rank r holds the keys/values of rank r - i and
attends its two query chunks to that rank's two key chunks, block by block
(`dist_mha.attention.kernels.blockwise`), merging the partial results with
log-sum-exp. Blocks that causal or window masking empties are skipped; under
the load-balanced layout every rank computes the same number of blocks. The
next K/V block is sent and received (`batch_isend_irecv`) while the current
one is computed.

Backward: the same ring, recomputing each block's gradients from the final
output and log-sum-exp. dQ accumulates locally; dK/dV accumulate in a buffer
that travels with the K/V block and returns to its owner after p steps.

Point-to-point traffic per rank and call: forward p-1 K/V blocks; backward
p-1 K/V blocks and p dK/dV blocks (float32 for half inputs). The tests count
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_mha.attention.kernels import blockwise
from dist_mha.attention.masks import positional_mask
from dist_mha.attention.segments import segment_mask
from dist_mha.parallel.cp.layout import chunk_ranges


@dataclass
class RingPlan:
    """Everything a ring call needs besides q/k/v (global masks, positions, kernel choice)."""

    group: object
    T: int  # global query length
    S: int  # global key length
    scale: float
    impl: str  # blockwise implementation
    k_keep_BS: torch.Tensor | None = None  # global key padding
    dense_BNTS: torch.Tensor | None = None  # global mask (this rank's heads or broadcast)
    causal: bool = False
    window: int | None = None
    q_seg_BT: torch.Tensor | None = None  # global document ids (packed sequences)
    k_seg_BS: torch.Tensor | None = None
    keep_fn: object = None  # dropout: fn(a0, a1, c0, c1) -> keep mask (B, n, t, s)
    rate: float = 0.0
    blocks: int = 0  # blocks this rank computed in the forward (skipped ones excluded)
    skipped: int = 0

    def __post_init__(self):
        self.p, self.r = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.next = dist.get_global_rank(self.group, (self.r + 1) % self.p)
        self.prev = dist.get_global_rank(self.group, (self.r - 1) % self.p)

    def q_ranges(self):
        return chunk_ranges(self.T, self.p, self.r)

    def k_ranges(self, src):
        return chunk_ranges(self.S, self.p, src)

    def block(self, a, c, device):
        """`(skip, mask or None, keep or None, is_causal)` for query range `a` against key range `c`.

        A diagonal block (same positions, causal, no window) is `is_causal`
        with no positional mask, so no (t, s) tensor is built for it.
        """
        (a0, a1), (c0, c1) = a, c
        if self.causal and a1 - 1 < c0:
            return True, None, None, False  # every key after every query
        if self.window is not None and max(0, c0 - (a1 - 1), a0 - (c1 - 1)) >= self.window:
            return True, None, None, False  # every key out of the window
        parts = []
        positional_full = (not self.causal or a0 >= c1 - 1) and (
            self.window is None or max(abs(a0 - (c1 - 1)), abs(a1 - 1 - c0)) < self.window)
        is_causal = not positional_full and self.causal and self.window is None and (a0, a1) == (c0, c1)
        if not positional_full and not is_causal:
            parts.append(positional_mask(a1 - a0, c1 - c0, self.causal, self.window, device, a0 - c0)[None, None])
        if self.k_keep_BS is not None:
            parts.append(self.k_keep_BS[:, c0:c1][:, None, None, :])
        if self.dense_BNTS is not None:
            parts.append(self.dense_BNTS[..., a0:a1, c0:c1])
        if self.q_seg_BT is not None:
            parts.append(segment_mask(self.q_seg_BT[:, a0:a1], self.k_seg_BS[:, c0:c1]))
        mask = None
        for part in parts:
            mask = part if mask is None else mask & part
        keep = self.keep_fn(a0, a1, c0, c1) if self.keep_fn is not None else None
        return False, mask, keep, is_causal


def _exchange(send: torch.Tensor, plan: RingPlan):
    """Starts sending `send` to the next rank and receiving the previous rank's; returns (buffer, requests)."""
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, plan.next, plan.group), dist.P2POp(dist.irecv, recv, plan.prev, plan.group)]
    return recv, dist.batch_isend_irecv(ops)


def _pack(k_BSKH, v_BSKH):
    """One contiguous buffer holding K then V (one transfer per step); the only copy of K/V made."""
    return torch.cat([k_BSKH.reshape(-1), v_BSKH.reshape(-1)])


def _unpack(flat, k_shape, v_shape):
    """`(k_BKSH, v_BKSH)` views of a packed `(B, S, K, H)` pair (the kernels take strided inputs)."""
    nk = k_shape.numel()
    return flat[:nk].view(k_shape).transpose(1, 2), flat[nk:].view(v_shape).transpose(1, 2)


def _chunks(x, dim):
    return x.chunk(2, dim=dim)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BTNH, k_BSKH, v_BSKH, plan: RingPlan):
        q = q_BTNH.transpose(1, 2)  # (B, n, t, H)
        k_shape, v_shape = k_BSKH.shape, v_BSKH.shape
        kv = _pack(k_BSKH, v_BSKH)
        q_parts = _chunks(q, 2)
        outs, lses = [None, None], [None, None]
        state = {}  # what a kernel's backward needs besides the merged output and LSE
        for step in range(plan.p):
            src = (plan.r - step) % plan.p
            pending = _exchange(kv, plan) if step < plan.p - 1 else None
            k_src, v_src = _unpack(kv, k_shape, v_shape)
            for qi, a in enumerate(plan.q_ranges()):
                for ki, (c, k_blk, v_blk) in enumerate(zip(plan.k_ranges(src), _chunks(k_src, 2), _chunks(v_src, 2))):
                    skip, mask, keep, is_causal = plan.block(a, c, q.device)
                    plan.skipped += skip
                    if skip:
                        continue
                    plan.blocks += 1
                    out_b, lse_b = blockwise.forward(plan.impl, q_parts[qi], k_blk, v_blk, mask, plan.scale, keep,
                                                     plan.rate, is_causal, state)
                    outs[qi], lses[qi] = blockwise.merge(outs[qi], lses[qi], out_b, lse_b)
            if pending is not None:
                recv, reqs = pending
                for req in reqs:
                    req.wait()
                kv = recv
        acc = blockwise.lse_dtype(q.dtype)
        for qi in range(2):
            if outs[qi] is None:  # no key visible to any row of the chunk
                B, n, t2, _ = q_parts[qi].shape
                outs[qi] = torch.zeros(B, n, t2, v_shape[-1], dtype=acc, device=q.device)
                lses[qi] = torch.full((B, n, t2), float("-inf"), dtype=acc, device=q.device)
        O = torch.cat(outs, dim=2).to(q.dtype)  # (B, n, t, Hv)
        L = torch.cat(lses, dim=2)
        ctx.save_for_backward(q_BTNH, k_BSKH, v_BSKH, O, L)
        ctx.plan, ctx.state = plan, state
        return O.transpose(1, 2)

    @staticmethod
    def backward(ctx, dO_BTNH):
        q_BTNH, k_BSKH, v_BSKH, O, L = ctx.saved_tensors
        plan = ctx.plan
        q = q_BTNH.transpose(1, 2)
        acc = blockwise.lse_dtype(q.dtype)
        dead = torch.isinf(L)
        dO = dO_BTNH.transpose(1, 2).masked_fill(dead[..., None], 0).to(q.dtype)
        L = L.masked_fill(dead, 0.0)
        D = (dO.to(acc) * O.to(acc)).sum(dim=-1)
        q_parts, dO_parts, O_parts = _chunks(q, 2), _chunks(dO, 2), _chunks(O, 2)
        L_parts, D_parts = _chunks(L, 2), _chunks(D, 2)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dq_parts = _chunks(dq, 2)
        k_shape, v_shape = k_BSKH.shape, v_BSKH.shape
        kv = _pack(k_BSKH, v_BSKH)
        dkv_out = None  # this step's dK/dV total for the block we hold, on its way to the next rank
        for step in range(plan.p):
            src = (plan.r - step) % plan.p
            kv_pending = _exchange(kv, plan) if step < plan.p - 1 else None
            dkv_pending = _exchange(dkv_out, plan) if dkv_out is not None else None
            k_src, v_src = _unpack(kv, k_shape, v_shape)
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            dk_src, dv_src = _unpack(dkv, k_shape, v_shape)
            for qi, a in enumerate(plan.q_ranges()):
                for ki, c in enumerate(plan.k_ranges(src)):
                    skip, mask, keep, is_causal = plan.block(a, c, q.device)
                    if skip:
                        continue
                    k_blk, v_blk = _chunks(k_src, 2)[ki], _chunks(v_src, 2)[ki]
                    dq_b, dk_b, dv_b = blockwise.backward(
                        plan.impl, dO_parts[qi], q_parts[qi], k_blk, v_blk, O_parts[qi], L_parts[qi], D_parts[qi],
                        mask, plan.scale, keep, plan.rate, is_causal, ctx.state)
                    dq_parts[qi].add_(dq_b)
                    _chunks(dk_src, 2)[ki].add_(dk_b)
                    _chunks(dv_src, 2)[ki].add_(dv_b)
            if dkv_pending is not None:
                recv, reqs = dkv_pending
                for req in reqs:
                    req.wait()
                dkv += recv  # what the ranks before us added for this block
            if kv_pending is not None:
                recv, reqs = kv_pending
                for req in reqs:
                    req.wait()
                kv = recv
            dkv_out = dkv
        recv, reqs = _exchange(dkv_out, plan)  # the last block we hold goes home; ours arrives
        for req in reqs:
            req.wait()
        dk, dv = _unpack(recv, k_shape, v_shape)
        return (dq.to(q.dtype).transpose(1, 2), dk.to(k_BSKH.dtype).transpose(1, 2), dv.to(v_BSKH.dtype).transpose(1, 2),
                None)


def ring_attention(q_BTNH, k_BSKH, v_BSKH, plan: RingPlan) -> torch.Tensor:
    """Attention of this rank's queries over the whole (sharded) sequence: `(B, t, n, Hv)`."""
    return _RingAttention.apply(q_BTNH, k_BSKH, v_BSKH, plan)

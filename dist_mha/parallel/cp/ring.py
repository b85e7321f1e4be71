"""Ring attention: exact attention over a sequence split across the CP group.

Shape legend: B batch, T/S global query/key lengths, t/s this rank's rows
(two chunks of t/2, s/2; see layout.py), n/k this rank's query/key-value
heads, H/Hv head sizes; `*_BNTH` tensors put heads before positions.

Forward: p steps. At step i rank r holds the keys/values of rank r - i and
attends its query tiles (its two chunks, or smaller tiles when the masks of
a whole chunk would be large) to that rank's two key chunks, block by block,
merging the partial results with log-sum-exp. Blocks that causal or window
masking empties are skipped; under the load-balanced layout every rank
computes the same number of blocks. The next K/V block is sent and received
(`batch_isend_irecv`) while the current one is computed.

Backward: the same ring, recomputing each block's gradients from the final
output and log-sum-exp. dQ accumulates locally; dK/dV accumulate in a buffer
that travels with the K/V block and returns to its owner after p steps.

This module moves blocks; it computes none. The caller injects the block
kernel (`forward`, `backward`, `merge`, `lse_dtype`, and for attention sinks
`add_sinks`, `sinks_grad`: dist_mha's are in
`dist_mha.attention.kernels.blockwise`) and the mask slicer (`block(q_range,
k_range) -> (skip, mask, keep, is_causal)` in global positions). Sinks join
each row's softmax once, after the last block is merged.

Point-to-point traffic per rank and call: forward p-1 K/V blocks; backward
p-1 K/V blocks and p dK/dV blocks (float32 for half inputs). The tests count
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_mha.parallel.cp.layout import chunk_ranges


@dataclass
class RingPlan:
    """Everything a ring call needs besides q/k/v.

    Attributes:
        group: the CP group.
        T, S: global query and key lengths.
        kernel: the block kernel (see the module docstring).
        block: the mask slicer `(q_range, k_range) -> (skip, mask, keep, is_causal)`.
        tile: query rows per block (None: a whole chunk); smaller tiles bound
            the memory of masks that vary along the queries.
    """

    group: object
    T: int
    S: int
    kernel: object
    block: object
    tile: int | None = None
    blocks: int = 0  # blocks this rank computed in the forward (skipped ones excluded)
    skipped: int = 0

    def __post_init__(self):
        self.p, self.r = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.next = dist.get_global_rank(self.group, (self.r + 1) % self.p)
        self.prev = dist.get_global_rank(self.group, (self.r - 1) % self.p)

    def q_tiles(self) -> list[tuple[tuple[int, int], slice]]:
        """`(global query range, this rank's rows)` per query tile, in local order."""
        tiles, local = [], 0
        for a0, a1 in chunk_ranges(self.T, self.p, self.r):
            step = a1 - a0 if self.tile is None else max(1, self.tile)
            for i in range(a0, a1, step):
                j = min(i + step, a1)
                tiles.append(((i, j), slice(local + i - a0, local + j - a0)))
            local += a1 - a0
        return tiles

    def k_ranges(self, src):
        return chunk_ranges(self.S, self.p, src)


def _exchange(send: torch.Tensor, plan: RingPlan):
    """Starts sending `send` to the next rank and receiving the previous rank's; returns (buffer, requests)."""
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, plan.next, plan.group), dist.P2POp(dist.irecv, recv, plan.prev, plan.group)]
    return recv, dist.batch_isend_irecv(ops)


def _finish(pending):
    """Waits for an exchange; returns the received buffer."""
    recv, reqs = pending
    for req in reqs:
        req.wait()
    return recv


def _pack(k_BSKH, v_BSKH):
    """One contiguous buffer holding K then V (one transfer per step); the only copy of K/V made."""
    return torch.cat([k_BSKH.reshape(-1), v_BSKH.reshape(-1)])


def _unpack(flat, k_shape, v_shape):
    """`(k_BKSH, v_BKSH)` views of a packed `(B, S, K, H)` pair (the kernels take strided inputs)."""
    nk = k_shape.numel()
    return flat[:nk].view(k_shape).transpose(1, 2), flat[nk:].view(v_shape).transpose(1, 2)


def _kv_blocks(flat, k_shape, v_shape, plan, src):
    """`[(global key range, k_BKsH, v_BKsH)]` of the two chunks rank `src` holds."""
    k, v = _unpack(flat, k_shape, v_shape)
    return list(zip(plan.k_ranges(src), k.chunk(2, dim=2), v.chunk(2, dim=2)))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BTNH, k_BSKH, v_BSKH, sinks, plan: RingPlan):
        q = q_BTNH.transpose(1, 2)  # (B, n, t, H)
        kernel, tiles = plan.kernel, plan.q_tiles()
        kv = _pack(k_BSKH, v_BSKH)
        outs, lses = [None] * len(tiles), [None] * len(tiles)
        state = {}  # what a kernel's backward needs besides the merged output and LSE
        for step in range(plan.p):
            pending = _exchange(kv, plan) if step < plan.p - 1 else None
            for (c, k_blk, v_blk) in _kv_blocks(kv, k_BSKH.shape, v_BSKH.shape, plan, (plan.r - step) % plan.p):
                for i, (a, rows) in enumerate(tiles):
                    skip, mask, keep, is_causal = plan.block(a, c)
                    plan.skipped += skip
                    if skip:
                        continue
                    plan.blocks += 1
                    out_b, lse_b = kernel.forward(q[:, :, rows], k_blk, v_blk, mask, keep, is_causal, state)
                    outs[i], lses[i] = kernel.merge(outs[i], lses[i], out_b, lse_b)
            if pending is not None:
                kv = _finish(pending)
        acc = kernel.lse_dtype(q.dtype)
        for i, (_, rows) in enumerate(tiles):
            if outs[i] is None:  # no key visible to any row of the tile
                B, n, _, _ = q.shape
                t = rows.stop - rows.start
                outs[i] = torch.zeros(B, n, t, v_BSKH.shape[-1], dtype=acc, device=q.device)
                lses[i] = torch.full((B, n, t), float("-inf"), dtype=acc, device=q.device)
        O, L = torch.cat(outs, dim=2), torch.cat(lses, dim=2)  # (B, n, t, Hv), (B, n, t)
        if sinks is not None:
            O, L = kernel.add_sinks(O, L, sinks)
        O = O.to(q.dtype)
        ctx.save_for_backward(q_BTNH, k_BSKH, v_BSKH, O, L, sinks)
        ctx.plan, ctx.state = plan, state
        return O.transpose(1, 2)

    @staticmethod
    def backward(ctx, dO_BTNH):
        q_BTNH, k_BSKH, v_BSKH, O, L, sinks = ctx.saved_tensors
        plan, kernel = ctx.plan, ctx.plan.kernel
        tiles = plan.q_tiles()
        q = q_BTNH.transpose(1, 2)
        acc = kernel.lse_dtype(q.dtype)
        dead = torch.isinf(L)
        dO = dO_BTNH.transpose(1, 2).masked_fill(dead[..., None], 0).to(q.dtype)
        L = L.masked_fill(dead, 0.0)
        D = (dO.to(acc) * O.to(acc)).sum(dim=-1)
        d_sinks = None if sinks is None or not ctx.needs_input_grad[3] else kernel.sinks_grad(L, D, sinks)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = _pack(k_BSKH, v_BSKH)
        dkv_out = None  # this step's dK/dV total for the block we hold, on its way to the next rank
        for step in range(plan.p):
            src = (plan.r - step) % plan.p
            kv_pending = _exchange(kv, plan) if step < plan.p - 1 else None
            dkv_pending = _exchange(dkv_out, plan) if dkv_out is not None else None
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            grads = _kv_blocks(dkv, k_BSKH.shape, v_BSKH.shape, plan, src)
            for (c, k_blk, v_blk), (_, dk_blk, dv_blk) in zip(_kv_blocks(kv, k_BSKH.shape, v_BSKH.shape, plan, src),
                                                               grads):
                for a, rows in tiles:
                    skip, mask, keep, is_causal = plan.block(a, c)
                    if skip:
                        continue
                    dq_b, dk_b, dv_b = kernel.backward(dO[:, :, rows], q[:, :, rows], k_blk, v_blk, O[:, :, rows],
                                                       L[:, :, rows], D[:, :, rows], mask, keep, is_causal, ctx.state)
                    dq[:, :, rows].add_(dq_b)
                    dk_blk.add_(dk_b)
                    dv_blk.add_(dv_b)
            if dkv_pending is not None:
                dkv += _finish(dkv_pending)  # what the ranks before us added for this block
            if kv_pending is not None:
                kv = _finish(kv_pending)
            dkv_out = dkv
        dk, dv = _unpack(_finish(_exchange(dkv_out, plan)), k_BSKH.shape, v_BSKH.shape)  # ours comes home
        return (dq.to(q.dtype).transpose(1, 2), dk.to(k_BSKH.dtype).transpose(1, 2), dv.to(v_BSKH.dtype).transpose(1, 2),
                d_sinks, None)


def ring_attention(q_BTNH, k_BSKH, v_BSKH, plan: RingPlan, sinks=None) -> torch.Tensor:
    """Attention of this rank's queries over the whole (sharded) sequence: `(B, t, n, Hv)`.

    `sinks`: optional `(n,)` logit per query head joined to every row's softmax.
    """
    return _RingAttention.apply(q_BTNH, k_BSKH, v_BSKH, sinks, plan)

"""One training step's data and loss under DP x CP x TP.

Shape legend: R rows, L row length (global), l = L / cp this rank's part.

Every rank of a CP group draws the same batch (a pure function of the step
and the DP rank), keeps its part of the sequence (`shard_sequence`; segment
ids stay whole: masks and positions are global) and scores its own tokens.
The loss is the mean over every scored token of the step, across DP and
CP: each rank divides its sum by the global count, so summing the ranks'
losses, and their gradients over the DP x CP group, gives exactly the
one-device mean and its gradient, even when ranks hold different numbers
of scored tokens (packed documents, text).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_mha.parallel import shard_sequence


@dataclass
class StepBatch:
    tokens: torch.Tensor  # (R, l)
    targets: torch.Tensor  # (R, l)
    mask: torch.Tensor  # (R, l) scored positions
    segment_ids: torch.Tensor | None  # (R, L), global
    scored: float  # scored tokens of the step over DP x CP (the loss denominator)
    tokens_seen: float  # non-padding tokens of the step over DP


def step_batch(data, step: int, state, batch_size: int, device) -> StepBatch:
    """This rank's part of step `step`'s batch, and the step's global counts (one small all-reduce under DP)."""
    parts = data.batch(step, state.dp_rank, batch_size)
    tokens, targets, mask = parts[:3]
    seg = parts[3] if len(parts) > 3 else None
    counts = torch.tensor([float(mask.sum()), float((seg >= 0).sum() if seg is not None else tokens.numel())],
                          dtype=torch.float64)
    if state.dp_size > 1:
        dist.all_reduce(counts, group=state.dp_group)
    if state.cp_size > 1:
        tokens, targets, mask = (shard_sequence(t, state.cp_group) for t in (tokens, targets, mask))
    return StepBatch(tokens.to(device), targets.to(device), mask.to(device),
                     None if seg is None else seg.to(device), float(counts[0]), float(counts[1]))


def loss_share(logits: torch.Tensor, batch: StepBatch, global_mean: bool) -> torch.Tensor:
    """This rank's share of the step's loss.

    `global_mean`: the sum over this rank's scored tokens divided by the
    step's global count (sum the shares over DP x CP for the loss); otherwise
    this rank's own mean (DeepSpeed averages gradients over DP itself).
    """
    picked = logits[batch.mask]
    # Half-precision logits are upcast for a stable softmax; float64 stays float64.
    picked = picked.float() if picked.dtype in (torch.float16, torch.bfloat16) else picked
    total = F.cross_entropy(picked, batch.targets[batch.mask], reduction="sum")
    if global_mean:
        return total / batch.scored
    return total / max(int(batch.mask.sum()), 1)


def sum_grads(params, group) -> None:
    """Sums gradients over `group` (DP x CP) in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or group is None or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()

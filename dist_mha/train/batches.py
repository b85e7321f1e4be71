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
from dist_mha.parallel.groups import host_all_reduce, size_of


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
    # Host-side counts (the batch is made on the CPU): they travel on the DP group's gloo companion.
    counts = torch.tensor([float(mask.sum()), float((seg >= 0).sum() if seg is not None else tokens.numel())],
                          dtype=torch.float64)
    host_all_reduce(counts, state.dp_group)
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
    # Every position's loss, masked, rather than `logits[mask]`: boolean indexing reads the mask back to the
    # host (a device synchronisation per step on a GPU). Half-precision logits are upcast for a stable
    # softmax; float64 stays float64.
    flat = logits.flatten(0, -2)
    flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
    mask = batch.mask.flatten()
    per_token = F.cross_entropy(flat, torch.where(mask, batch.targets.flatten(), 0), reduction="none")
    total = (per_token * mask).sum()
    if global_mean:
        return total / batch.scored
    return total / mask.sum().clamp(min=1)


def sum_grads(params, group) -> None:
    """Sums gradients over `group` (DP x CP) in one flat all-reduce.

    A parameter without a gradient on this rank (unused in its forward) takes
    part as zeros, so every rank reduces a buffer of the same length and
    layout (a shorter buffer on one rank would hang NCCL or scramble the sum).
    """
    params = [p for p in params if p.requires_grad]
    if not params or size_of(group) == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
        offset += p.grad.numel()

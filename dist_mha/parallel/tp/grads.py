"""Gradient-norm clipping that sees the full model under tensor parallelism.

A TP rank holds shards of some parameters and full copies of the others.
The global norm counts every shard once (summed across the TP group) and
every replicated parameter once. Sharded parameters carry
`tensor_model_parallel = True` (and DeepSpeed's `model_parallel = True`, so
DeepSpeed's own clipping with our `mpu` counts them the same way).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def mark_sharded(*params, replicas: int = 1, tp_size: int = 1) -> None:
    """Tags parameters that are split across the TP group.

    `replicas > 1`: each shard is held by that many ranks (key/value heads of
    grouped-query attention when there are fewer of them than TP ranks), so
    its squared norm counts `1 / replicas` per rank in `clip_grad_norm_`.
    DeepSpeed's clipping counts `model_parallel` tensors on every rank and the
    others on TP rank 0 only: exact for split tensors and for a head held by
    every rank (`replicas == tp_size`, tagged not model-parallel); for
    `1 < replicas < tp_size` it counts each head `replicas` times.
    """
    for p in params:
        if p is not None:
            p.tensor_model_parallel = True
            p.model_parallel = not (replicas > 1 and replicas == tp_size)
            p.tp_replicas = replicas


def is_sharded(p) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def clip_grad_norm_(params, max_norm: float, tp_group=None) -> torch.Tensor:
    """Scales gradients in place so that their global norm is at most `max_norm`; returns the norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    device = params[0].grad.device
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        sq = p.grad.detach().double().pow(2).sum()
        if is_sharded(p):
            sharded += sq / getattr(p, "tp_replicas", 1)
        else:
            replicated += sq
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    norm = (sharded + replicated).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(scale.to(p.grad.dtype))
    return norm

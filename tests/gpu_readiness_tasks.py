"""Rank-pool task bodies for the GPU-readiness tests (module-level so workers can import them)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from dist_mha import MultiHeadAttention
from dist_mha.parallel import sharding

E = 12


@contextlib.contextmanager
def group_reported_as_nccl(target):
    """Makes `target` report the NCCL backend and refuse CPU tensors in broadcast, as ProcessGroupNCCL does.

    Every collective still runs for real (on gloo); only the refusal NCCL
    would raise is added, so code that would send a CPU tensor on an NCCL
    group fails here as it would on GPUs.
    """
    real_backend, real_broadcast = dist.get_backend, dist.broadcast
    cached = dict(sharding._CPU_GROUPS)

    def get_backend(g=None):
        return "nccl" if g is target else real_backend(g)

    def broadcast(tensor, *args, group=None, **kwargs):
        if group is target and tensor.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu (a CPU tensor on an NCCL group)")
        return real_broadcast(tensor, *args, group=group, **kwargs)

    dist.get_backend, dist.broadcast = get_backend, broadcast
    try:
        yield
    finally:
        dist.get_backend, dist.broadcast = real_backend, real_broadcast
        sharding._CPU_GROUPS.clear()
        sharding._CPU_GROUPS.update(cached)


def eager_build_on_nccl_group(ctx, tp):
    """Eager build (`query_shape=`) with no `device=` on a group that reports NCCL; returns the agreed base."""
    group = ctx.group(tp)
    with group_reported_as_nccl(group):
        torch.manual_seed(100 + ctx.rank)  # rank-dependent on purpose: the broadcast must make them agree
        base = sharding.agreed_random_base(group)
        MultiHeadAttention(4, 3, query_shape=E, tp_group=group, check_ranks=False)
    return base

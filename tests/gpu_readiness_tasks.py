"""Rank-pool task bodies for the GPU-readiness tests (module-level so workers can import them)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from dist_mha import MultiHeadAttention
from dist_mha.parallel import agreement, groups

E = 12


@contextlib.contextmanager
def group_reported_as_nccl(target):
    """Makes `target` report the NCCL backend and refuse CPU tensors in broadcast, as ProcessGroupNCCL does.

    Every collective still runs for real (on gloo); only the refusal NCCL
    would raise is added, so code that would send a CPU tensor on an NCCL
    group fails here as it would on GPUs.
    """
    real_backend, real_broadcast = dist.get_backend, dist.broadcast
    cached = dict(groups._CPU_GROUPS)

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
        groups._CPU_GROUPS.clear()
        groups._CPU_GROUPS.update(cached)


def eager_build_on_nccl_group(ctx, tp):
    """Eager build (`query_shape=`) with no `device=` on a group that reports NCCL; returns the agreed base."""
    group = ctx.group(tp)
    with group_reported_as_nccl(group):
        torch.manual_seed(100 + ctx.rank)  # rank-dependent on purpose: the broadcast must make them agree
        base = agreement.agreed_random_base(group)
        MultiHeadAttention(4, 3, query_shape=E, tp_group=group, check_ranks=False)
    return base


def region_without_copies(ctx, tp):
    """The output all-reduce sums the partial output in place; one entered tensor's gradient is all-reduced
    where it arrives. Returns (checks, gradient errors)."""
    from dist_mha.parallel import region

    group = ctx.group(tp)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(0)
    w_all = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(world)]
    x_all = torch.randn(4, 3, generator=gen, dtype=torch.float64)

    # Leaving: out = sum over ranks of partial_r (+ bias once); dL/dW_r = x^T dout.
    w = w_all[rank].clone().requires_grad_()
    bias = torch.ones(5, dtype=torch.float64, requires_grad=True)
    partial = (x_all @ w).view(2, 2, 5)  # a view, as the output projection's result is
    ptr = partial.data_ptr()
    out = region.leave(group, False, partial, bias)
    inplace_leave = partial.data_ptr() == ptr and torch.allclose(partial, out - bias, rtol=0, atol=1e-12)
    expected = sum(x_all @ wr for wr in w_all).view(2, 2, 5) + bias
    dout = torch.randn(2, 2, 5, generator=gen, dtype=torch.float64)
    out.backward(dout)
    errors = [(out - expected).abs().max().item(), (w.grad - x_all.t() @ dout.view(4, 5)).abs().max().item()]

    # Entering one tensor: backward is one all-reduce of the incoming gradient, with no copy in between.
    x = x_all.clone().requires_grad_()
    entered = region.enter(group, False, x)[0]
    arrived, reduced = [], []
    entered.register_hook(lambda g: arrived.append(g.data_ptr()))
    real = dist.all_reduce

    def spy(t, *args, **kwargs):
        reduced.append(t.data_ptr())
        return real(t, *args, **kwargs)

    dist.all_reduce = spy
    try:
        (entered @ w_all[rank]).sum().backward()
    finally:
        dist.all_reduce = real
    expected_grad = sum(torch.ones(4, 5, dtype=torch.float64) @ wr.t() for wr in w_all)
    errors.append((x.grad - expected_grad).abs().max().item())
    inplace_enter = len(reduced) == 1 and reduced == arrived
    return {"inplace_leave": inplace_leave, "inplace_enter": inplace_enter}, errors


def rank_check_timeline(ctx, tp, sequence_parallel):
    """The order of one TP forward's events: the rank check's start and wait, the local attention, and the
    first collective (the real collectives run; they are only recorded)."""
    import dist_mha.engine.stages as engine

    group = ctx.group(tp)
    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 3, query_shape=E, tp_group=group, sequence_parallel=sequence_parallel)
    x = torch.randn(2, 8 // tp if sequence_parallel else 8, E)
    layer(x, x)  # warm-up
    events = []
    real_all_reduce, real_attention = dist.all_reduce, engine.attention
    gather_name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    real_gather = getattr(dist, gather_name)

    class Work:
        def __init__(self, work):
            self.work = work

        def wait(self, *args, **kwargs):
            events.append("check_wait")
            return self.work.wait(*args, **kwargs)

    def all_reduce(t, *args, **kwargs):
        if t.dtype == torch.int64:  # the rank check's payload
            events.append("check_start_async" if kwargs.get("async_op") else "check_sync")
            out = real_all_reduce(t, *args, **kwargs)
            return Work(out) if kwargs.get("async_op") else out
        events.append("all_reduce")
        return real_all_reduce(t, *args, **kwargs)

    def gather(*args, **kwargs):
        events.append("all_gather")
        return real_gather(*args, **kwargs)

    def attention(*args, **kwargs):
        events.append("attention")
        return real_attention(*args, **kwargs)

    dist.all_reduce, engine.attention = all_reduce, attention
    setattr(dist, gather_name, gather)
    try:
        layer(x, x)
    finally:
        dist.all_reduce, engine.attention = real_all_reduce, real_attention
        setattr(dist, gather_name, real_gather)
    return events


def companion_timeout(ctx, tp):
    """The gloo companion of a group reported as NCCL: its timeout (s) and the group's own (the pool's 30 s)."""
    group = ctx.group(tp)
    with group_reported_as_nccl(group):
        companion = groups.cpu_group(group)
        assert companion is not group
        return groups.timeout_of(companion).total_seconds(), groups.timeout_of(group).total_seconds()

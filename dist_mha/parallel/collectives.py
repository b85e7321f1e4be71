"""Autograd-aware collectives for the tensor-parallel region, named by region.

Each forward collective has its backward twin (Megatron's vocabulary):

| function            | forward                    | backward                   |
|---------------------|----------------------------|----------------------------|
| `copy_to_tp`        | identity                   | all-reduce (one, fused; in place for one tensor) |
| `reduce_from_tp`    | all-reduce (optionally in place) | identity             |
| `gather_from_tp`    | all-gather along `dim`     | keep own slice             |
| `scatter_to_tp`     | keep own slice             | all-gather along `dim`     |
| `gather_from_sp`    | all-gather along `dim`     | reduce-scatter along `dim` |
| `reduce_scatter_to_sp` | reduce-scatter along `dim` | all-gather along `dim`  |
| `all_to_all_tp`     | all-to-all (split `split_dim`, concat `cat_dim`) | the inverse |
| `copy_to_kv_replicas` | identity                 | sum over the ranks holding the same key/value head |

`group` is always an argument. `copy_to_tp` takes several tensors and
all-reduces their gradients as one flat buffer, so a cross-attention call
still costs exactly one backward all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_mha.parallel.groups import size_of


def _all_gather_flat(out, x, group):
    # torch 2.13 renamed the flat collectives; older torch has only the old names.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group)


def _reduce_scatter_flat(out, x, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, x, group=group)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenates every rank's `x` along `dim` (equal shapes)."""
    world = size_of(group)
    x = x.contiguous()
    # all_gather_into_tensor concatenates along dim 0; gather there, then move.
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_flat(out, x, group=group)
    if dim == 0:
        return out
    out = out.view(world, *x.shape)
    return torch.cat(out.unbind(0), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sums `x` over ranks and keeps this rank's slice along `dim`."""
    world = size_of(group)
    if x.shape[dim] % world:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over {world} ranks")
    chunks = torch.stack(x.chunk(world, dim=dim), dim=0).contiguous()  # (world, *chunk)
    out = torch.empty(chunks.shape[1:], dtype=x.dtype, device=x.device)
    _reduce_scatter_flat(out, chunks.view(-1, *chunks.shape[2:]), group=group)
    return out


def _own_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world, rank = size_of(group), dist.get_rank(group)
    if x.shape[dim] % world:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over {world} ranks")
    return x.chunk(world, dim=dim)[rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *xs):
        ctx.group = group
        outs = tuple(x.view_as(x) for x in xs)
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        present = [g for g in grads if g is not None]
        if len(present) == 1:
            # One gradient: all-reduced where it lies, no copy (see `copy_to_tp`).
            g = present[0].contiguous()
            dist.all_reduce(g, group=ctx.group)
            grads = tuple(None if x is None else g for x in grads)
        elif present:
            flat = torch.cat([g.reshape(-1) for g in present])
            dist.all_reduce(flat, group=ctx.group)
            it = iter(flat.split([g.numel() for g in present]))
            grads = tuple(None if g is None else next(it).view_as(g) for g in grads)
        return (None, *grads)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x, inplace):
        if inplace:
            ctx.mark_dirty(x)
        else:
            x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return None, grad, None


class _DimTwin(torch.autograd.Function):
    """A collective along `dim` whose backward is another collective along `dim`."""

    @staticmethod
    def forward(ctx, group, x, dim, fwd, bwd):
        ctx.group, ctx.dim, ctx.bwd = group, dim, bwd
        return fwd(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.bwd(grad, ctx.dim, ctx.group), None, None, None


class _AllToAllTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x, split_dim, cat_dim):
        ctx.group, ctx.split_dim, ctx.cat_dim = group, split_dim, cat_dim
        return _all_to_all(x, split_dim, cat_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return None, _all_to_all(grad, ctx.cat_dim, ctx.split_dim, ctx.group), None, None


def _all_to_all(x, split_dim, cat_dim, group):
    world = size_of(group)
    chunks = torch.stack(x.chunk(world, dim=split_dim), dim=0).contiguous()
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=group)
    return torch.cat(out.unbind(0), dim=cat_dim)


class _CopyToKVReplicas(torch.autograd.Function):
    """Identity forward; backward sums gradients over the `replicas` consecutive ranks sharing a unit.

    One all-reduce over the whole TP group of a `(units, n)` buffer holding
    each rank's gradients in its unit's row: no subgroups to create, and the
    payload is `units` times this rank's gradients (`units = tp / replicas`
    is small exactly when replication happens).
    """

    @staticmethod
    def forward(ctx, group, replicas, *xs):
        ctx.group, ctx.replicas = group, replicas
        outs = tuple(x.view_as(x) for x in xs)
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        present = [g for g in grads if g is not None]
        if present:
            world, rank = size_of(ctx.group), dist.get_rank(ctx.group)
            units = world // ctx.replicas
            flat = torch.cat([g.reshape(-1) for g in present])
            buf = flat.new_zeros(units, flat.numel())
            buf[rank // ctx.replicas] = flat
            dist.all_reduce(buf, group=ctx.group)
            it = iter(buf[rank // ctx.replicas].split([g.numel() for g in present]))
            grads = tuple(None if g is None else next(it).view_as(g) for g in grads)
        return (None, None, *grads)


def copy_to_kv_replicas(group, replicas, *xs):
    """Replicated key/value weights enter a forward pass: identity forward; backward sums the
    gradients of the `replicas` ranks that hold the same head (consecutive TP ranks), so the copies
    stay equal. One all-reduce for all of `xs`."""
    if size_of(group) == 1 or replicas <= 1:
        return xs if len(xs) > 1 else xs[0]
    return _CopyToKVReplicas.apply(group, replicas, *xs)


def copy_to_tp(group, *xs):
    """Enters the TP region: identity forward, one fused all-reduce of the gradients backward.

    With several tensors their gradients travel as one flat buffer. A single
    gradient is all-reduced in place, without a copy (as Megatron's
    `copy_to_tensor_model_parallel_region` does): the entered tensor's
    gradient must be its own, which holds when the entered tensor feeds
    layers whose backward makes a fresh gradient (linear, einsum, the fused
    projections), as everywhere in dist_mha. Do not add it to another tensor
    directly (`y + other` hands both the same gradient).
    """
    if size_of(group) == 1:
        return xs if len(xs) > 1 else xs[0]
    return _CopyToTP.apply(group, *xs)


def reduce_from_tp(group, x, inplace: bool = False):
    """Leaves the TP region: all-reduce (sum) forward, identity backward.

    `inplace=True` sums into `x` itself (no copy) and returns it; for a
    partial result nothing else reads, such as the output projection's.
    """
    return x if size_of(group) == 1 else _ReduceFromTP.apply(group, x, inplace)


def gather_from_tp(group, x, dim):
    """All-gathers a TP-sharded tensor along `dim`; backward keeps this rank's slice."""
    return x if size_of(group) == 1 else _DimTwin.apply(group, x, dim, _all_gather, _own_slice)


def scatter_to_tp(group, x, dim):
    """Keeps this rank's slice of a replicated tensor along `dim`; backward all-gathers."""
    return x if size_of(group) == 1 else _DimTwin.apply(group, x, dim, _own_slice, _all_gather)


def gather_from_sp(group, x, dim):
    """Sequence-parallel entry: all-gather along `dim`; backward reduce-scatters."""
    return x if size_of(group) == 1 else _DimTwin.apply(group, x, dim, _all_gather, _reduce_scatter)


def reduce_scatter_to_sp(group, x, dim):
    """Sequence-parallel exit: reduce-scatter along `dim`; backward all-gathers."""
    return x if size_of(group) == 1 else _DimTwin.apply(group, x, dim, _reduce_scatter, _all_gather)


def all_to_all_tp(group, x, split_dim, cat_dim):
    """All-to-all: split `split_dim` across ranks, concatenate what arrives along `cat_dim`."""
    return x if size_of(group) == 1 else _AllToAllTP.apply(group, x, split_dim, cat_dim)

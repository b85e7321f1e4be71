"""Head sharding of the Keras-layout weights, and what it implies.

Each TP rank owns `N / tp` consecutive heads: the `N` dim of the q/k/v/gate
kernels `(D, N, H)` and biases `(N, H)` (column-parallel), and of the
output kernel `(N, Hv, *out)` (row-parallel). The output bias is replicated.
Full tensors are never needed for the forward pass; they are gathered only
for `get_weights`, for non-additive regularizers and for arbitrary callable
constraints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_mha.parallel.collectives import gather_from_tp, reduce_from_tp


def tp_size_of(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def tp_rank_of(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def check_heads_divisible(num_heads: int, tp_size: int) -> None:
    """Raises before any collective when heads do not split evenly."""
    if num_heads % tp_size:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"Received num_heads={num_heads} with a tensor-parallel group of size {tp_size}: "
            f"heads must split evenly across ranks. Valid TP sizes for num_heads={num_heads}: "
            f"{valid}. Change the TP degree or num_heads."
        )


def head_range(num_heads: int, group) -> tuple[int, int]:
    local = num_heads // tp_size_of(group)
    start = tp_rank_of(group) * local
    return start, start + local


def shard_index(global_shape, shard_dim, num_heads, group):
    """The slices selecting this rank's block of a tensor sharded on `shard_dim`."""
    if shard_dim is None or tp_size_of(group) == 1:
        return None
    h0, h1 = head_range(num_heads, group)
    return (slice(None),) * shard_dim + (slice(h0, h1),)


def gather_full(t: torch.Tensor, shard_dim, group) -> torch.Tensor:
    """The full tensor from this rank's shard (autograd flows back to the shard)."""
    if shard_dim is None or tp_size_of(group) == 1:
        return t
    return gather_from_tp(group, t, shard_dim)


def own_slice(full: torch.Tensor, shard_dim, group) -> torch.Tensor:
    if shard_dim is None or tp_size_of(group) == 1:
        return full
    world, rank = tp_size_of(group), tp_rank_of(group)
    return full.chunk(world, dim=shard_dim)[rank]


def penalty(reg, t: torch.Tensor, shard_dim, group) -> torch.Tensor:
    """`reg` of the full tensor; shards add up their penalties when `reg` is additive."""
    if shard_dim is None or tp_size_of(group) == 1:
        return reg(t)
    if getattr(reg, "additive", False):
        return reduce_from_tp(group, reg(t))
    return reg(gather_full(t, shard_dim, group))


def constrain(c, p: torch.Tensor, shard_dim, group) -> torch.Tensor:
    """Applies constraint `c` to a (possibly sharded) weight, reducing norms that span shards."""
    if shard_dim is None or tp_size_of(group) == 1:
        return c(p)
    if getattr(c, "needs_norm", True):
        axis = getattr(c, "axis", None)
        axes = range(p.dim()) if axis is None else ([axis] if isinstance(axis, int) else axis)
        spans = shard_dim in {a % p.dim() for a in axes}
        if type(c).__name__ == "_CallableConstraint":
            return own_slice(c(gather_full(p, shard_dim, group)), shard_dim, group)
        if spans:
            def allreduce_sum(x):
                x = x.clone()
                dist.all_reduce(x, group=group)
                return x

            return c(p, allreduce_sum=allreduce_sum)
    return c(p)


def agreed_random_base(group, device=None) -> int:
    """One draw from torch's global RNG, the same on every rank of `group` (its rank 0's).

    Seeds everything a sharded module randomises, so that `torch.manual_seed`
    governs it and TP=N draws exactly what TP=1 draws.
    """
    base = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if tp_size_of(group) > 1:
        if device is not None and torch.device(device).type == "cuda":
            base, comm = base.to(device), group
        else:
            # Built without a CUDA device (e.g. eagerly, before `.to("cuda")`): an
            # NCCL group rejects CPU tensors, so the draw travels on the group's gloo companion.
            comm = cpu_group(group)
        dist.broadcast(base, src=dist.get_global_rank(group, 0), group=comm)
    return int(base.item())


_CPU_GROUPS: dict = {}  # cache: TP ranks -> a gloo group over them (one per TP group, made once)


def cpu_group(group):
    """A gloo group over the ranks of `group` (the group itself when it is gloo).

    The rank-agreement check runs there on CPU tensors, so it never waits for
    the GPU: on an NCCL group a CUDA tensor read back would sync every call.
    Created with local synchronisation, so only the group's ranks take part.
    """
    if group is None or dist.get_backend(group) == "gloo":
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _CPU_GROUPS:
        _CPU_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    return _CPU_GROUPS[ranks]


def check_ranks_agree(group, values: list[int], names: list[str]) -> None:
    """Raises on every rank when the ranks of `group` disagree on `values`.

    One all-reduce of `2 * len(values)` int64 (max of v and of -v); every
    rank sees the same result, so all raise together instead of hanging in a
    mismatched collective.
    """
    v = torch.tensor(values, dtype=torch.int64)  # CPU: `group` must be a gloo group (see cpu_group)
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, lo = both[: len(values)], -both[len(values) :]
    hi, lo = hi.tolist(), lo.tolist()
    bad = [names[i] for i in range(len(values)) if hi[i] != lo[i]]
    if bad:
        raise ValueError(
            f"Tensor-parallel ranks disagree on {', '.join(bad)} (this rank: "
            f"{', '.join(f'{names[i]}={values[i]}' for i in range(len(values)) if names[i] in bad)}). "
            "Every rank of a TP group must call the layer with inputs of the same shapes and the "
            "same call arguments (replicated inputs; sequence shards of equal size)."
        )

"""Head sharding of the Keras-layout weights, and what it implies.

Each TP rank owns `N / tp` consecutive query heads: the `N` dim of the
q/gate kernels `(D, N, H)` and biases `(N, H)` (column-parallel), and of the
output kernel `(N, Hv, *out)` (row-parallel). The output bias is replicated.

Key/value heads (K of them; grouped-query attention has K < N, query head
`i` reads key/value head `i // (N / K)`) follow the query heads:
- `K % tp == 0`: each rank owns `K / tp` consecutive key/value heads, exactly
  the ones its query heads read;
- `K < tp` (`tp % K == 0`): each rank holds the one key/value head its query
  heads read, replicated on `tp / K` ranks (its "replicas"). The replicas'
  weight gradients are summed (`copy_to_kv_replicas`) so the copies stay equal.

A sharded tensor is described by its shard dim, `units` (how many heads or
features that dim holds in full) and `replicas` (ranks per unit; 1 unless
`units < tp`). Full tensors are never needed for the forward pass; they are
gathered only for `get_weights`, for non-additive regularizers and for
arbitrary callable constraints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_mha.parallel.collectives import copy_to_kv_replicas, gather_from_tp, reduce_from_tp
from dist_mha.parallel.groups import rank_of, size_of


def valid_tp_sizes(num_heads: int, num_kv_heads: int | None = None) -> list[int]:
    """TP degrees that split `num_heads` query heads (and `num_kv_heads` key/value heads)."""
    kv = num_heads if num_kv_heads is None else num_kv_heads
    return [t for t in range(1, num_heads + 1) if num_heads % t == 0 and (kv % t == 0 or t % kv == 0)]


def check_heads_divisible(num_heads: int, tp_size: int, num_kv_heads: int | None = None) -> None:
    """Raises before any collective when heads do not split across `tp_size` ranks."""
    valid = valid_tp_sizes(num_heads, num_kv_heads)
    if tp_size in valid:
        return
    if num_kv_heads is None or num_kv_heads == num_heads:
        raise ValueError(
            f"Received num_heads={num_heads} with a tensor-parallel group of size {tp_size}: "
            f"heads must split evenly across ranks. Valid TP sizes for num_heads={num_heads}: "
            f"{valid}. Change the TP degree or num_heads."
        )
    raise ValueError(
        f"Received num_query_heads={num_heads} and num_key_value_heads={num_kv_heads} with a "
        f"tensor-parallel group of size {tp_size}: query heads must split evenly across ranks, and "
        "key/value heads must either split evenly or each be replicated on a whole number of ranks "
        f"(tp % num_key_value_heads == 0). Valid TP sizes: {valid}. Change the TP degree or the head counts."
    )


def replicas_of(units: int, group) -> int:
    """Ranks holding each unit: `tp / units` when there are fewer units than ranks, else 1."""
    tp = size_of(group)
    return tp // units if units < tp else 1


def head_range(units: int, group) -> tuple[int, int]:
    """`[start, stop)` of the units (heads) this rank holds along a sharded dim."""
    tp, rank = size_of(group), rank_of(group)
    if units < tp:
        start = rank // (tp // units)
        return start, start + 1
    local = units // tp
    return rank * local, (rank + 1) * local


def shard_index(global_shape, shard_dim, units, group):
    """The slices selecting this rank's block of a tensor sharded on `shard_dim` into `units`."""
    if shard_dim is None or size_of(group) == 1:
        return None
    h0, h1 = head_range(units, group)
    return (slice(None),) * shard_dim + (slice(h0, h1),)


def gather_full(t: torch.Tensor, shard_dim, group, replicas: int = 1) -> torch.Tensor:
    """The full tensor from this rank's shard (autograd flows back to the shard).

    With `replicas > 1` each unit is taken from its first replica; the
    gradient reaches that replica only, so differentiate through
    `sync_replicas` (as `penalty` does) to keep the replicas' gradients equal.
    """
    if shard_dim is None or size_of(group) == 1:
        return t
    full = gather_from_tp(group, t, shard_dim)
    if replicas > 1:
        full = torch.cat(full.chunk(size_of(group), dim=shard_dim)[::replicas], dim=shard_dim)
    return full


def own_slice(full: torch.Tensor, shard_dim, group, replicas: int = 1) -> torch.Tensor:
    """This rank's block of a full tensor (the inverse of `gather_full`)."""
    if shard_dim is None or size_of(group) == 1:
        return full
    world, rank = size_of(group), rank_of(group)
    return full.chunk(world // replicas, dim=shard_dim)[rank // replicas]


def sync_replicas(group, replicas: int, *params):
    """`params` as used in a forward pass: their gradients are summed across replicas (identity at 1).

    Local views of DTensor parameters (`dist_mha.parallel.dtensor`) pass
    through: their DTensor gradient already sums the replicas over TP.
    """
    if replicas <= 1 or size_of(group) == 1 or getattr(params[0], "_dist_mha_dtensor_grad", False):
        return params if len(params) > 1 else params[0]
    return copy_to_kv_replicas(group, replicas, *params)


def penalty(reg, t: torch.Tensor, shard_dim, group, replicas: int = 1) -> torch.Tensor:
    """`reg` of the full tensor; shards add up their penalties when `reg` is additive.

    Replicated shards each count `1 / replicas` of their penalty (a
    non-additive `reg` sees each unit once). For a replicated *weight*, pass
    `sync_replicas(group, replicas, weight)` so the replicas' partial
    gradients are summed; an activation needs no such step, since the
    gradients reach the weights, which are synced where they are used.
    """
    if shard_dim is None or size_of(group) == 1:
        return reg(t)
    if getattr(reg, "additive", False):
        own = reg(t)
        return reduce_from_tp(group, own / replicas if replicas > 1 else own)
    return reg(gather_full(t, shard_dim, group, replicas))


def constrain(c, p: torch.Tensor, shard_dim, group, replicas: int = 1) -> torch.Tensor:
    """Applies constraint `c` to a (possibly sharded) weight, reducing norms that span shards."""
    if shard_dim is None or size_of(group) == 1:
        return c(p)
    if getattr(c, "needs_norm", True):
        axis = getattr(c, "axis", None)
        axes = range(p.dim()) if axis is None else ([axis] if isinstance(axis, int) else axis)
        spans = shard_dim in {a % p.dim() for a in axes}
        if type(c).__name__ == "_CallableConstraint":
            return own_slice(c(gather_full(p, shard_dim, group, replicas)), shard_dim, group, replicas)
        if spans:
            def allreduce_sum(x):
                x = x.clone()
                dist.all_reduce(x, group=group)
                # Every unit is held by `replicas` ranks: count it once.
                return x / replicas if replicas > 1 else x

            return c(p, allreduce_sum=allreduce_sum)
    return c(p)

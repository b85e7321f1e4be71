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


def tp_size_of(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def tp_rank_of(group) -> int:
    return 0 if group is None else dist.get_rank(group)


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
    tp = tp_size_of(group)
    return tp // units if units < tp else 1


def head_range(units: int, group) -> tuple[int, int]:
    """`[start, stop)` of the units (heads) this rank holds along a sharded dim."""
    tp, rank = tp_size_of(group), tp_rank_of(group)
    if units < tp:
        start = rank // (tp // units)
        return start, start + 1
    local = units // tp
    return rank * local, (rank + 1) * local


def shard_index(global_shape, shard_dim, units, group):
    """The slices selecting this rank's block of a tensor sharded on `shard_dim` into `units`."""
    if shard_dim is None or tp_size_of(group) == 1:
        return None
    h0, h1 = head_range(units, group)
    return (slice(None),) * shard_dim + (slice(h0, h1),)


def gather_full(t: torch.Tensor, shard_dim, group, replicas: int = 1) -> torch.Tensor:
    """The full tensor from this rank's shard (autograd flows back to the shard).

    With `replicas > 1` each unit is taken from its first replica; the
    gradient reaches that replica only, so differentiate through
    `sync_replicas` (as `penalty` does) to keep the replicas' gradients equal.
    """
    if shard_dim is None or tp_size_of(group) == 1:
        return t
    full = gather_from_tp(group, t, shard_dim)
    if replicas > 1:
        full = torch.cat(full.chunk(tp_size_of(group), dim=shard_dim)[::replicas], dim=shard_dim)
    return full


def own_slice(full: torch.Tensor, shard_dim, group, replicas: int = 1) -> torch.Tensor:
    """This rank's block of a full tensor (the inverse of `gather_full`)."""
    if shard_dim is None or tp_size_of(group) == 1:
        return full
    world, rank = tp_size_of(group), tp_rank_of(group)
    return full.chunk(world // replicas, dim=shard_dim)[rank // replicas]


def sync_replicas(group, replicas: int, *params):
    """`params` as used in a forward pass: their gradients are summed across replicas (identity at 1)."""
    if replicas <= 1 or tp_size_of(group) == 1:
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
    if shard_dim is None or tp_size_of(group) == 1:
        return reg(t)
    if getattr(reg, "additive", False):
        own = reg(t)
        return reduce_from_tp(group, own / replicas if replicas > 1 else own)
    return reg(gather_full(t, shard_dim, group, replicas))


def constrain(c, p: torch.Tensor, shard_dim, group, replicas: int = 1) -> torch.Tensor:
    """Applies constraint `c` to a (possibly sharded) weight, reducing norms that span shards."""
    if shard_dim is None or tp_size_of(group) == 1:
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
    Created with local synchronisation, so only the group's ranks take part,
    and with the group's own timeout (else torch's 30-minute default would let
    a hung peer block the check that long).
    """
    if group is None or dist.get_backend(group) == "gloo":
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _CPU_GROUPS:
        timeout = _timeout_of(group)
        kwargs = {} if timeout is None else {"timeout": timeout}
        _CPU_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True, **kwargs)
    return _CPU_GROUPS[ranks]


def _timeout_of(group):
    """The collective timeout `group` was created with (None if torch does not say)."""
    try:
        for device in group._device_types:
            return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        pass
    return None


def check_ranks_agree(group, values: list[int], names: list[str], shown: list[str] | None = None) -> None:
    """Raises on every rank when the ranks of `group` disagree on `values`.

    One all-reduce of `2 * len(values)` int64 (max of v and of -v); every
    rank sees the same result, so all raise together instead of hanging in a
    mismatched collective. `shown`: this rank's values as text for the
    message (dtype names, mask shapes), parallel to `values`.
    """
    # Kept flat (no helper calls after the read-back): under torch.compile the
    # `.tolist()` is the call's one graph break, and each nested frame would add one.
    v = torch.tensor(values, dtype=torch.int64)  # CPU: `group` must be a gloo group (see cpu_group)
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, lo = both[: len(values)], -both[len(values) :]
    hi, lo = hi.tolist(), lo.tolist()
    bad = [i for i in range(len(values)) if hi[i] != lo[i]]
    if bad:
        _disagree(group, values, names, shown, bad)


class PendingAgreement:
    """A rank-agreement all-reduce in flight; `wait()` finishes it and raises on disagreement."""

    def __init__(self, group, values, names, shown, both, work):
        self.group, self.values, self.names, self.shown, self.both, self.work = group, values, names, shown, both, work

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        _raise_on_disagreement(self.group, self.values, self.names, self.shown, self.both)


def start_ranks_agree(group, values: list[int], names: list[str], shown: list[str] | None = None) -> PendingAgreement:
    """`check_ranks_agree` in two halves (eager mode): the all-reduce starts now (gloo runs it on its own
    thread), and `wait()` on the result finishes it, so local work can overlap the round trip."""
    v = torch.tensor(values, dtype=torch.int64)  # CPU: `group` must be a gloo group (see cpu_group)
    both = torch.cat([v, -v])
    work = dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group, async_op=True)
    return PendingAgreement(group, values, names, shown, both, work)


def _raise_on_disagreement(group, values, names, shown, both) -> None:
    hi, lo = both[: len(values)], -both[len(values) :]
    hi, lo = hi.tolist(), lo.tolist()
    bad = [i for i in range(len(values)) if hi[i] != lo[i]]
    if bad:
        _disagree(group, values, names, shown, bad)


def _disagree(group, values, names, shown, bad) -> None:
    shown = shown or [str(x) for x in values]
    raise ValueError(
        f"Tensor-parallel ranks disagree on {', '.join(names[i] for i in bad)} (this rank, "
        f"{tp_rank_of(group)}: {', '.join(f'{names[i]}={shown[i]}' for i in bad)}). "
        "Every rank of a TP group must call the layer with inputs of the same shapes and dtypes and the "
        "same call arguments (replicated inputs; sequence shards of equal size); masks too."
    )

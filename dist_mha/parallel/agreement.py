"""Rank agreement: one value every rank of a group holds, and checks that ranks were called alike.

`agreed_random_base` makes initialisation a function of rank 0's RNG, so
weights are equal on every rank of the groups that replicate them (TP and
CP ranks of one model replica), whatever seeds the ranks were given.
`check_ranks_agree` proves, with one small all-reduce, that every rank of a
group passes the same shapes and flags, so a mismatch raises on every rank
instead of hanging in a mismatched collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_mha.parallel.groups import cpu_group, rank_of, size_of


def agreed_random_base(*groups) -> int:
    """One draw from torch's global RNG, the same on every rank of `groups` (the first rank's of all).

    Seeds everything a sharded module randomises, so that `torch.manual_seed`
    on the first rank governs it and TP=N (or CP=N) draws exactly what one
    device draws, even when the ranks were seeded differently. With several
    groups (TP, then CP) the value travels along each in turn, so every rank
    of their product ends with the value of the rank that is first in all.
    """
    base = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    for group in groups:
        if size_of(group) > 1:  # a CPU value: on the group's gloo companion (NCCL refuses CPU tensors)
            dist.broadcast(base, src=dist.get_global_rank(group, 0), group=cpu_group(group))
    return int(base.item())


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
        f"{rank_of(group)}: {', '.join(f'{names[i]}={shown[i]}' for i in bad)}). "
        "Every rank of a TP group must call the layer with inputs of the same shapes and dtypes and the "
        "same call arguments (replicated inputs; sequence shards of equal size); masks too."
    )

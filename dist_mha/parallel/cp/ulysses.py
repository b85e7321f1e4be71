"""Ulysses attention: trade the sequence shard for a head shard, attend locally, trade back.

Shape legend: B batch, T/S global query/key lengths, t/s this rank's rows,
n/k this rank's query/key-value heads (after tensor parallelism), p the CP
group size, H/Hv head sizes.

Before attention one all-to-all per tensor turns `(B, t, n, H)` into
`(B, T, n/p, H)`: every rank now holds the whole sequence for n/p heads. The
rows arrive in rank order (each rank's two chunks, see context.py) and are
put in natural order, so the local kernel (flash-attn, SDPA with `is_causal`,
or math) sees an ordinary sequence with global masks. One all-to-all brings
the output back to `(B, t, n, Hv)`. Key/value heads: all-to-all when `k`
divides by p; when p divides by k each rank needs one head, so every rank
sends each peer that peer's head of its rows (one all-to-all of one head per
peer, not an all-gather of all k). The collectives are autograd twins
(`all_to_all_tp`: the backward sums the gradients of a head sent to several
peers).
"""

from __future__ import annotations

import torch

from dist_mha.parallel.collectives import all_to_all_tp
from dist_mha.parallel.cp.layout import chunk_ranges
from dist_mha.parallel.groups import size_of


def _order(length, group, device):
    """`(to_natural, to_gathered)` index vectors for rows gathered in rank order."""
    p = size_of(group)
    gathered = torch.cat([torch.arange(a, b, device=device) for r in range(p) for a, b in chunk_ranges(length, p, r)])
    return torch.argsort(gathered), gathered


def scatter_heads(x_BtNH, group, to_natural):
    """`(B, t, n, H)` sequence shard -> `(B, T, n/p, H)` in natural order."""
    full = all_to_all_tp(group, x_BtNH, 2, 1)
    return full.index_select(1, to_natural)


def gather_heads(x_BTNH, group, to_gathered):
    """The inverse of `scatter_heads`: `(B, T, n/p, Hv)` -> `(B, t, n, Hv)`."""
    return all_to_all_tp(group, x_BTNH.index_select(1, to_gathered), 1, 2)


def kv_heads(x_BsKH, group, to_natural, query_heads: int):
    """Key/value `(B, s, k, H)` -> `(B, S, k', H)` for this rank's n/p query heads.

    `k % p == 0`: an all-to-all (k/p heads each). Otherwise (`p % k == 0`)
    rank d needs the one head its query heads read, `(d * n/p) // (n/k)`:
    each rank lays out that head of its rows for every d and the all-to-all
    delivers `(B, S, 1, H)`.
    """
    p, k = size_of(group), x_BsKH.shape[2]
    if k % p == 0:
        return scatter_heads(x_BsKH, group, to_natural)
    wanted = torch.tensor([(d * (query_heads // p)) // (query_heads // k) for d in range(p)], device=x_BsKH.device)
    return scatter_heads(x_BsKH.index_select(2, wanted), group, to_natural)


def orders(T: int, S: int, group, device):
    """Index vectors for the query and key sequences (computed once per call)."""
    return _order(T, group, device), _order(S, group, device)

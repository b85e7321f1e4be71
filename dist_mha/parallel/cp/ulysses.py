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
divides by p; when p divides by k each rank needs one head, so K/V are
all-gathered along the sequence and the head this rank's queries read is kept.
The collectives are autograd twins (`all_to_all_tp`, `gather_from_sp`).
"""

from __future__ import annotations

import torch

from dist_mha.parallel.collectives import all_to_all_tp, gather_from_sp
from dist_mha.parallel.cp.layout import chunk_ranges, cp_rank_of, cp_size_of


def _order(length, group, device):
    """`(to_natural, to_gathered)` index vectors for rows gathered in rank order."""
    p = cp_size_of(group)
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

    `k % p == 0`: an all-to-all (k/p heads each). Otherwise (`p % k == 0`) an
    all-gather of the sequence, keeping the one head this rank's queries read.
    """
    p, r, k = cp_size_of(group), cp_rank_of(group), x_BsKH.shape[2]
    if k % p == 0:
        return scatter_heads(x_BsKH, group, to_natural)
    full = gather_from_sp(group, x_BsKH, 1).index_select(1, to_natural)  # (B, S, k, H), natural order
    head = (r * (query_heads // p)) // (query_heads // k)
    return full[:, :, head:head + 1]


def orders(T: int, S: int, group, device):
    """Index vectors for the query and key sequences (computed once per call)."""
    return _order(T, group, device), _order(S, group, device)

"""Context parallelism: the sequence layout across the CP group, and the attention call under it.

Shape legend: B batch, T/S global query/key lengths, t/s this rank's lengths
(T/cp, S/cp), p the CP group size, C = T / (2p) a chunk, n/k this rank's
query/key-value heads (after tensor parallelism), H/Hv head sizes.

Layout (load-balanced for causal attention): the sequence is cut into 2p
equal chunks and rank r holds chunks r and 2p-1-r, in that order. Under a
causal mask chunk c of queries sees chunks 0..c of keys, so every rank gets
one "early" and one "late" chunk and the same amount of work. The same
layout serves every mask; `shard_sequence` and `gather_sequence` convert
between it and the natural order.

A layer with `cp_group=` takes and returns this rank's part of each sequence
(`shard_sequence(x, cp_group)`), while its masks stay global: `query_mask`
`(B, T)`, `value_mask`/`key_mask` `(B, S)`, `attention_mask` broadcastable to
`(B, N, T, S)`, and causal / `sliding_window` use global positions. Two
modes (`cp_mode`):
- "ring" (`ring.py`): K/V blocks travel around the group; each rank merges
  blockwise attention of its queries with log-sum-exp;
- "ulysses" (`ulysses.py`): an all-to-all trades the sequence shard for a
  head shard, the local kernel sees the whole sequence for n/p heads, and
  a second all-to-all trades back.
"""

from __future__ import annotations

import torch

from dist_mha.parallel.collectives import gather_from_tp
from dist_mha.parallel.groups import rank_of, size_of

CP_MODES = ("ring", "ulysses")


def chunk_ranges(length: int, p: int, r: int) -> list[tuple[int, int]]:
    """The two `[start, stop)` ranges of global positions rank `r` of `p` holds, in local order."""
    if length % (2 * p):
        raise ValueError(
            f"Context parallelism over {p} ranks cuts the sequence into 2*{p} = {2 * p} equal chunks (load "
            f"balance for causal attention); a sequence of length {length} does not split. Pad or trim it to a "
            f"multiple of {2 * p}."
        )
    c = length // (2 * p)
    return [(r * c, (r + 1) * c), ((2 * p - 1 - r) * c, (2 * p - r) * c)]


def positions(length: int, cp_group, device=None) -> torch.Tensor:
    """Global positions (int64) of this rank's part of a sequence of `length`, in local order."""
    p, r = size_of(cp_group), rank_of(cp_group)
    if p == 1:
        return torch.arange(length, device=device)
    return torch.cat([torch.arange(a, b, device=device) for a, b in chunk_ranges(length, p, r)])


def shard_sequence(x: torch.Tensor, cp_group, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full tensor along `dim` (chunks r and 2p-1-r of 2p); differentiable.

    Args:
        x: the full tensor (the same on every rank of `cp_group`).
        cp_group: the context-parallel process group (None: `x` itself).
        dim: the sequence dim.

    Returns:
        `x` restricted to this rank's positions along `dim`, `x.shape[dim] / p` long.

    Raises:
        ValueError: if `x.shape[dim]` is not a multiple of `2 * p`.

    Example:

    >>> x_local = shard_sequence(x, cp_group)            # (B, T/cp, E)
    >>> y_local = layer(x_local, x_local, use_causal_mask=True)
    >>> y = gather_sequence(y_local, cp_group)           # (B, T, E)
    """
    p = size_of(cp_group)
    if p == 1:
        return x
    (a0, a1), (b0, b1) = chunk_ranges(x.shape[dim], p, rank_of(cp_group))
    return torch.cat([x.narrow(dim, a0, a1 - a0), x.narrow(dim, b0, b1 - b0)], dim=dim)


def gather_sequence(y: torch.Tensor, cp_group, dim: int = 1) -> torch.Tensor:
    """The full tensor from every rank's part (the inverse of `shard_sequence`).

    One all-gather; differentiable for a replicated use of the result (the
    backward keeps this rank's part of the gradient).
    """
    p = size_of(cp_group)
    if p == 1:
        return y
    if y.shape[dim] % 2:
        raise ValueError(f"Received a local part of length {y.shape[dim]} along dim {dim}; shard_sequence gives "
                         "each rank two equal chunks, so local lengths are even.")
    parts = gather_from_tp(cp_group, y, dim).chunk(2 * p, dim=dim)  # rank order: r's chunks 2r, 2r+1
    natural = [None] * (2 * p)
    for r in range(p):
        natural[r], natural[2 * p - 1 - r] = parts[2 * r], parts[2 * r + 1]
    return torch.cat(natural, dim=dim)


def check_cp_layer(layer, cp_group, cp_mode) -> None:
    """Constructor checks for `cp_group=` / `cp_mode=` (before any collective)."""
    if cp_mode not in CP_MODES:
        raise ValueError(f"Received an invalid value for argument `cp_mode`, expected one of {CP_MODES}. "
                         f"Received: cp_mode={cp_mode!r}")
    p = size_of(cp_group)
    if p == 1:
        return
    if layer.sequence_parallel and layer.tp_size > 1:
        raise ValueError(
            "Received sequence_parallel=True with a cp_group: the sequence is already split across the CP group; "
            "combine context parallelism with tensor parallelism without sequence parallelism."
        )
    if cp_mode == "ulysses":
        n = layer._num_heads // layer.tp_size
        if n % p:
            valid = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(
                f"cp_mode='ulysses' splits this rank's {n} query heads (num_heads={layer._num_heads} / tp="
                f"{layer.tp_size}) across the CP group of size {p}: they must divide evenly. Valid CP sizes: "
                f"{valid}. Use cp_mode='ring' (any CP size), or change the CP or TP degree."
            )
        k = max(layer._num_kv_heads // layer.tp_size, 1)
        if k % p and p % k:
            valid = [d for d in range(1, n + 1) if n % d == 0 and (k % d == 0 or d % k == 0)]
            raise ValueError(
                f"cp_mode='ulysses' splits (or replicates) this rank's {k} key/value heads across the CP group of "
                f"size {p}: {k} must divide by {p} or {p} by {k}. Valid CP sizes: {valid}. Use cp_mode='ring'."
            )


def check_cp_call(layer, query, value, return_scores, cache) -> None:
    """Per-call checks under context parallelism."""
    if return_scores:
        raise ValueError(
            "return_attention_scores=True is not available under context parallelism: no rank holds a row's scores "
            "over the whole sequence. Call the layer without cp_group (or gather the sequence) to get scores."
        )
    if cache is not None:
        raise ValueError("KV-cache decoding runs without context parallelism; build the layer without cp_group.")
    if query.dim() != 3:
        raise ValueError(f"Context parallelism takes rank-3 inputs (batch, seq, features). Received: "
                         f"query.shape={tuple(query.shape)}")
    for name, x in (("query", query), ("value", value)):
        if x.shape[1] % 2:
            raise ValueError(
                f"Under context parallelism `{name}` is this rank's part of the sequence: two equal chunks "
                f"(dist_mha.parallel.shard_sequence), so its length is even. Received: {name}.shape={tuple(x.shape)}"
            )

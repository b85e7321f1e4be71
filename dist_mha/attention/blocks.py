"""Causal and sliding-window masking of a block of queries against a block of keys, in one place.

Shape legend: T queries of the block, S keys of the block.

Query at position `i` sees key at position `j` iff `j <= i` (causal) and
`|i - j| < window` (sliding window), Keras's top-left alignment. Every
kernel asks the same question about its block (a whole call, a ring block,
one packed document): does the block need a mask, can a kernel flag
express it, is it empty? `relation` answers it once, with integer
arithmetic only (no tensor is read, so nothing waits for the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY, FULL, CAUSAL, PARTIAL = "empty", "full", "causal", "partial"


@dataclass(frozen=True)
class Relation:
    """How causal/window masking relates the queries at positions `[q0, q0 + T)` to the keys at `[k0, k0 + S)`.

    Attributes:
        kind: "empty" (no query sees a key), "full" (every query sees every
            key), "causal" (query `i` of the block sees keys `j <= i`: the
            `is_causal` flag of SDPA and of torch's flash kernels) or
            "partial" (anything else: `mask()` builds it).
        T, S: query and key counts of the block.
        offset: `q0 - k0`, the key index of query 0's position.
        causal, window: the constraints.
    """

    kind: str
    T: int
    S: int
    offset: int
    causal: bool
    window: int | None

    @property
    def bottom_right(self) -> bool:
        """Whether query `T - 1` sits at key `S - 1` (flash-attn aligns causal and window masks so)."""
        return self.offset == self.S - self.T

    def mask(self, device) -> torch.Tensor | None:
        """`(T, S)` bool, True where a query sees a key; None for "full"."""
        if self.kind == FULL:
            return None
        return positional_mask(self.T, self.S, self.causal, self.window, device, self.offset)

    def live_rows(self) -> tuple[int, int]:
        """`[lo, hi)`: the query rows that see at least one key (the others form a prefix and a suffix).

        Row `i` sees keys `j` in `[i + offset - w + 1, i + offset + w - 1]`
        (window w), cut at `i + offset` when causal, within `[0, S)`; both
        ends grow with `i`, so the rows with a key are one range.
        """
        if self.S == 0 or self.kind == EMPTY:
            return 0, 0
        lo, hi = 0, self.T  # rows i with a visible key: lo <= i < hi
        if self.causal:
            lo = max(lo, -self.offset)  # key 0 is at or before the query
        if self.window is not None:
            lo = max(lo, -self.offset - self.window + 1)  # key 0 is less than a window ahead of the query
            hi = min(hi, self.S - 1 - self.offset + self.window)  # key S-1 is less than a window behind it
        return min(lo, self.T), max(min(hi, self.T), min(lo, self.T))


def relation(q0: int, q1: int, k0: int, k1: int, causal: bool, window: int | None) -> Relation:
    """The `Relation` of queries at positions `[q0, q1)` to keys at positions `[k0, k1)`."""
    T, S, offset = q1 - q0, k1 - k0, q0 - k0

    def made(kind):
        return Relation(kind, T, S, offset, causal, window)

    if not causal and window is None:
        return made(FULL)
    if T == 0 or S == 0:
        return made(EMPTY)
    if causal and q1 - 1 < k0:
        return made(EMPTY)  # every key after every query
    if window is not None and max(0, k0 - (q1 - 1), q0 - (k1 - 1)) >= window:
        return made(EMPTY)  # every key out of every query's window
    sees_all = (not causal or q0 >= k1 - 1) and (window is None or max(abs(q0 - (k1 - 1)), abs(q1 - 1 - k0)) < window)
    if sees_all:
        return made(FULL)
    if causal and window is None and offset == 0:
        return made(CAUSAL)
    return made(PARTIAL)


_POSITIONAL: dict = {}  # (T, S, causal, window, offset, device) -> mask; callers only read them
_POSITIONAL_BYTES = [0]
POSITIONAL_CACHE_BYTES = 64 * 2**20  # bounded by memory: a mask at T = S = 32k is 1 GiB on its own


def positional_mask(T: int, S: int, causal: bool, window: int | None, device, offset: int = 0) -> torch.Tensor:
    """`(T, S)` bool: causal (`i + offset >= j`) and/or band `|i + offset - j| < window`.

    `offset=0` is Keras's top-left alignment. Masks are cached per shape,
    offset and device up to `POSITIONAL_CACHE_BYTES` in all (oldest first
    out; a mask larger than the budget is never kept), so a training loop
    builds each one once.
    """
    key = (T, S, bool(causal), window, offset, str(device))
    compiling = torch.compiler.is_compiling()
    cached = None if compiling else _POSITIONAL.get(key)
    if cached is not None:
        return cached
    rows = torch.arange(offset, offset + T, device=device)[:, None]
    cols = torch.arange(S, device=device)[None, :]
    keep = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        keep = keep & (rows >= cols)
    if window is not None:
        keep = keep & ((rows - cols).abs() < window)
    if not compiling and T * S <= POSITIONAL_CACHE_BYTES:
        while _POSITIONAL and _POSITIONAL_BYTES[0] + T * S > POSITIONAL_CACHE_BYTES:
            _POSITIONAL_BYTES[0] -= _POSITIONAL.pop(next(iter(_POSITIONAL))).numel()
        _POSITIONAL[key] = keep
        _POSITIONAL_BYTES[0] += T * S
    return keep

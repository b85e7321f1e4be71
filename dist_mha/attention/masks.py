"""The masks of one attention call, kept apart, and the one place that combines them.

Shape legend: B batch, T query positions, S key positions, N heads (see layout.py).

Materialising Keras's merged (B, T, S) mask is what makes masked attention
slow and O(T*S) in memory, so the pieces stay apart in a `MaskSpec` (parsed
from Keras's arguments by `keras_masks.build_mask_spec`) and each kernel asks
`block` for exactly what it cannot take natively: SDPA and torch's flash
kernels take top-left causal as a flag, flash-attn takes causal and key
padding, and query padding is applied to output rows afterwards.

Fully masked query rows (every key masked) get a zero attention context on
every backend; Keras's result there depends on its code path. `live_rows`
finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_mha.attention.blocks import CAUSAL, EMPTY, PARTIAL, Relation, relation
from dist_mha.attention.segments import segment_mask


@dataclass
class MaskSpec:
    """Masks for one attention call, in kernel layout; True keeps.

    Attributes:
        q_keep_BT: `(B, T)` query rows to keep; dropped rows output zeros.
        k_keep_BS: `(B, S)` keys that may be attended (value & key masks).
        dense_BNTS: bool, broadcastable to `(B, N, T, S)`, or None.
        causal: causal constraint: query `i` sees key `j` iff `j <= i + q_offset`
            (Keras's top-left alignment when `q_offset == 0`).
        window: sliding-window size (keys within `window - 1` of `i + q_offset`), or None.
        q_offset: key position of query row 0 (a KV cache's length). `S - T`
            is bottom-right alignment.
        q_seg_BT, k_seg_BS: document ids of packed sequences (`segments.py`):
            a query sees only keys of its document; negative ids are padding.
    """

    q_keep_BT: torch.Tensor | None = None
    k_keep_BS: torch.Tensor | None = None
    dense_BNTS: torch.Tensor | None = None
    causal: bool = False
    window: int | None = None
    q_offset: int = 0
    q_seg_BT: torch.Tensor | None = None
    k_seg_BS: torch.Tensor | None = None

    @property
    def is_empty(self) -> bool:
        return (
            self.q_keep_BT is None
            and self.k_keep_BS is None
            and self.dense_BNTS is None
            and not self.causal
            and self.window is None
            and self.q_seg_BT is None
        )

    def relation(self, rows: tuple[int, int], cols: tuple[int, int]) -> Relation:
        """The causal/window `Relation` of query rows `rows` to key columns `cols` (indices of this call)."""
        return relation(rows[0] + self.q_offset, rows[1] + self.q_offset, cols[0], cols[1], self.causal, self.window)

    def block(self, rows: tuple[int, int], cols: tuple[int, int], device, include_query: bool = False):
        """`(relation, mask)` for query rows `[r0, r1)` against keys `[c0, c1)` of this call.

        `mask` is bool, broadcastable to `(B, N, r1 - r0, c1 - c0)`, or None
        when nothing but the relation constrains the block. It holds the
        positional part only when the relation is "partial" or "empty": a
        "causal" block leaves it to the kernel's flag (or to
        `relation.mask()`, AND-ed by a caller without one). Broadcast dims
        of `dense_BNTS` (size 1) are kept, not sliced. `include_query` adds
        the query padding, for kernels that do not zero those rows after.
        """
        (r0, r1), (c0, c1) = rows, cols
        rel = self.relation(rows, cols)
        parts = []
        if rel.kind in (PARTIAL, EMPTY):
            parts.append(rel.mask(device)[None, None])
        if self.dense_BNTS is not None:
            d = self.dense_BNTS
            rows_, cols_ = slice(r0, r1) if d.shape[-2] > 1 else slice(None), slice(c0, c1) if d.shape[-1] > 1 else slice(None)
            parts.append(d[..., rows_, cols_])
        if self.k_keep_BS is not None:
            parts.append(self.k_keep_BS[:, None, None, c0:c1])
        if include_query and self.q_keep_BT is not None:
            parts.append(self.q_keep_BT[:, None, r0:r1, None])
        if self.q_seg_BT is not None:
            parts.append(segment_mask(self.q_seg_BT[:, r0:r1], self.k_seg_BS[:, c0:c1]))
        return rel, _all(parts)

    def combined(self, T: int, S: int, device, include_query: bool = True):
        """AND of every constraint over the whole call, broadcastable to `(B, N, T, S)`; None when unconstrained."""
        rel, mask = self.block((0, T), (0, S), device, include_query)
        if rel.kind == CAUSAL:
            mask = _all([rel.mask(device)[None, None], mask])
        return mask


def _all(parts):
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    mask = parts[0]
    for part in parts[1:]:
        mask = mask & part
    return mask


def live_rows(mask, T: int, is_causal: bool = False):
    """Rows that see at least one key: bool broadcastable to `(B, N, T)`, from a mask `(B|1, N|1, T|1, S)`.

    None for no mask (every row sees a key). `is_causal`: the mask is
    applied together with a top-left causal flag (row i sees keys `0..i`
    only), as a kernel given both applies it.
    """
    if mask is None:
        return None
    if is_causal:
        S = mask.shape[-1]
        if mask.shape[-2] == 1:
            # Key padding under a causal flag: row i sees a key iff one of keys 0..min(i, S-1) is kept.
            seen = mask.cummax(dim=-1).values.squeeze(-2)  # (B|1, N|1, S)
            idx = torch.arange(T, device=mask.device).clamp_(max=S - 1)
            return seen.index_select(-1, idx)
        mask = mask & torch.ones(T, S, dtype=torch.bool, device=mask.device).tril()
    return mask.any(dim=-1)

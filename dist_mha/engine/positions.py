"""The position ids of one call's queries and keys, for rotary embeddings.

Shape legend: B batch, T/S global query/key positions of the call (new keys
only, with a cache), t/s this rank's rows (T/cp under context parallelism).

Positions follow the call, in this order of precedence:
- `position_ids`: int `(B, T)` for the queries (and the keys of
  self-attention), or a pair `(q_pos (B, T), k_pos (B, S))`, passed in full
  (global) under context parallelism, like masks and `segment_ids`;
- `segment_ids`: positions restart at 0 at each document's first token,
  computed on the global ids before this rank keeps its rows;
- otherwise `0..T-1`, continuing from the cache's length with a KV cache.
"""

from __future__ import annotations

import torch

from dist_mha.attention.segments import document_positions, is_pair
from dist_mha.parallel.cp.layout import positions as cp_positions


def _ids(x, name, shape, device):
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception:
            x = None
    if x is None or x.dtype in (torch.bool,) or x.is_floating_point() or x.is_complex():
        got = "None" if x is None else str(x.dtype)
        raise ValueError(f"Received an invalid value for argument `{name}`, expected an integer tensor of shape "
                         f"{tuple(shape)} (the position of each token). Received: {name} with dtype {got}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"Received an invalid value for argument `{name}`, expected shape {tuple(shape)} (batch, "
                         f"positions; global under context parallelism). Received: {name}.shape={tuple(x.shape)}")
    return x.to(device=device, dtype=torch.int64)


def call_positions(layer, c, position_ids):
    """`(q_pos (B|1, t), k_pos (B|1, s), longest or None)`; `longest` = largest position + 1 when known on the host.

    `k_pos is q_pos` for self-attention with one set of positions.
    """
    device = c.query.device
    start = 0 if c.cache is None else c.cache.length
    T, S = c.T, c.S - start  # global, this call's keys
    q_rows = cp_positions(T, layer.cp_group, device)  # this rank's rows, global indices
    k_rows = q_rows if S == T else cp_positions(S, layer.cp_group, device)
    self_attention = c.value is c.query
    if position_ids is not None:
        B = c.query.shape[0]
        if is_pair(position_ids):
            q_ids = _ids(position_ids[0], "position_ids[0] (query positions)", (B, T), device)
            k_ids = _ids(position_ids[1], "position_ids[1] (key positions)", (B, S), device)
        elif self_attention or S == T:
            q_ids = k_ids = _ids(position_ids, "position_ids", (B, T), device)
        else:
            raise ValueError("A single `position_ids` tensor gives the positions of both queries and keys; for "
                             f"cross-attention with {T} queries and {S} keys pass a pair (query_pos, key_pos).")
        return _local(layer, q_ids, k_ids, q_rows, k_rows)
    m = c.masks
    if m.q_seg_BT is not None:
        q_ids = document_positions(m.q_seg_BT)
        k_ids = q_ids if m.k_seg_BS is m.q_seg_BT else document_positions(m.k_seg_BS)
        return _local(layer, q_ids, k_ids, q_rows, k_rows)
    q_pos = (start + q_rows)[None]
    k_pos = q_pos if k_rows is q_rows else (start + k_rows)[None]
    return q_pos, k_pos, start + max(T, S)


def _local(layer, q_ids, k_ids, q_rows, k_rows):
    """This rank's rows of global ids; the longest position (global: the same on every CP rank) when a rope
    type depends on it (one host read)."""
    q_pos = q_ids.index_select(1, q_rows)
    k_pos = q_pos if (k_ids is q_ids and k_rows is q_rows) else k_ids.index_select(1, k_rows)
    longest = None
    if layer._rope.depends_on_length:
        longest = int(torch.maximum(q_ids.max(), k_ids.max())) + 1
    return q_pos, k_pos, longest


def one_range(layer, c) -> bool:
    """Whether every row's queries sit at positions `start..start+T-1` (known on the host; one range per row)."""
    return c.mask_args["position_ids"] is None and c.masks.q_seg_BT is None and layer.cp_size == 1

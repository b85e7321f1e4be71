"""Packed sequences: segment ids for attention, and positions that restart per document.

Shape legend: B batch, T query positions, S key positions.

Several documents packed into one row are told apart by an int id per
position: a query attends only to keys with its id, and a negative id marks
padding (such a query gets a zero context, like a row with every key
masked). Self-attention takes one `(B, T)` tensor; cross-attention a pair
`(query_ids (B, T), key_ids (B, S))`. With `use_causal_mask=True` attention
is causal within each document (positions stay the row's positions, so a
document's first token sees only itself), and `sliding_window` counts
positions the same way. The result is exactly what the equivalent
`attention_mask` gives: `(q_ids[:, :, None] == k_ids[:, None, :]) & (k_ids >= 0)[:, None, :]`.
"""

from __future__ import annotations

import numpy as np
import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _ids(x, name, shape, device):
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception:
            x = None
    if x is None or x.dtype not in _INT_DTYPES:
        got = "None" if x is None else str(x.dtype)
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected an integer tensor of shape {tuple(shape)} "
            f"(one document id per position; negative for padding). Received: {name} with dtype {got}"
        )
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected shape {tuple(shape)} (batch, positions). "
            f"Received: {name}.shape={tuple(x.shape)}"
        )
    return x.to(device=device, dtype=torch.int64)


def _ndim(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.dim()
    try:
        return np.ndim(x)
    except ValueError:  # ragged nested lists
        return -1


def is_pair(segment_ids) -> bool:
    """A `(query_ids, key_ids)` pair: two 2-D id arrays. A list of two rows of ids is one `(2, T)` tensor."""
    return isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2 and all(_ndim(x) == 2 for x in segment_ids)


def parse_segment_ids(segment_ids, query_shape, value_shape, self_attention: bool, device):
    """`(q_ids_BT, k_ids_BS)` from the call argument, or `(None, None)`.

    Raises:
        ValueError: if the ids are not integer tensors of the inputs' (B, T) / (B, S),
            or a single tensor is given for cross-attention with S != T.
    """
    if segment_ids is None:
        return None, None
    if len(query_shape) != 3:
        raise ValueError(f"`segment_ids` take rank-3 inputs (batch, seq, features). Received query of shape "
                         f"{tuple(query_shape)}")
    if is_pair(segment_ids):
        q = _ids(segment_ids[0], "segment_ids[0] (query ids)", query_shape[:2], device)
        k = _ids(segment_ids[1], "segment_ids[1] (key ids)", value_shape[:2], device)
        return q, k
    if not self_attention and tuple(query_shape[:2]) != tuple(value_shape[:2]):
        raise ValueError(
            "A single `segment_ids` tensor labels the positions of both query and key; for cross-attention with "
            f"query length {query_shape[1]} and key length {value_shape[1]} pass a pair (query_ids, key_ids)."
        )
    q = _ids(segment_ids, "segment_ids", query_shape[:2], device)
    return q, q


def segment_mask(q_ids_BT, k_ids_BS) -> torch.Tensor:
    """`(B, 1, T, S)` bool: same document, and the key is not padding."""
    return (q_ids_BT[:, None, :, None] == k_ids_BS[:, None, None, :]) & (k_ids_BS >= 0)[:, None, None, :]


def document_positions(ids_BT: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document (a run of equal ids), `(B, T)` int64.

    Documents are contiguous runs; a new run starts where the id changes.
    Padding (negative ids) gets positions too (they are never attended).
    """
    T = ids_BT.shape[1]
    t = torch.arange(T, device=ids_BT.device).expand_as(ids_BT)
    start = torch.ones_like(ids_BT, dtype=torch.bool)
    start[:, 1:] = ids_BT[:, 1:] != ids_BT[:, :-1]
    first = torch.where(start, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - first

"""Checks on the inputs of one `MultiHeadAttention` call.

Every check runs before any collective, so a bad input raises a ValueError
naming it instead of surfacing as a hang or a crash inside gloo/NCCL.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_mha.attention.segments import is_pair
from dist_mha.parallel import agreement

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_cache_call(layer, cache, query, value, causal) -> None:
    """A call with `cache=`: rank-3 inputs, no sequence parallelism, causal calls add one key per query."""
    from dist_mha.attention.kv_cache import KVCache

    if not isinstance(cache, KVCache):
        raise ValueError(
            "Received an invalid value for argument `cache`, expected a dist_mha KVCache from "
            f"layer.init_cache(batch_size, max_length). Received: cache of type {type(cache).__name__}"
        )
    if query.dim() != 3:
        raise ValueError(f"KV-cache decoding takes rank-3 inputs (batch, seq, features). Received: query.shape={tuple(query.shape)}")
    if layer.sequence_parallel and layer.tp_size > 1:
        raise ValueError(
            "KV-cache decoding runs without sequence parallelism (a decoding step has one position). Build the "
            "layer (or model) for generation with sequence_parallel=False: the weights are the same."
        )
    if layer._rope is not None and layer._rope.rope_type == "dynamic":
        raise ValueError(
            "rope_type='dynamic' rescales every position by the longest one of a call, so keys cached by earlier "
            "calls were rotated with other frequencies: it cannot be exact with a KV cache. Use another rope_type "
            "for decoding, or call without a cache."
        )
    if causal and value.shape[1] != query.shape[1]:
        raise ValueError(
            "With use_causal_mask=True and a cache, each call appends the keys of its own positions: `value` must "
            f"have the query's length. Received: query.shape={tuple(query.shape)}, value.shape={tuple(value.shape)}"
        )


_MASK_DTYPES = ("bool", "int", "float", "other")
MASK_ARGS = ("query_mask", "value_mask", "key_mask", "attention_mask", "segment_ids", "position_ids")
_CHECK_VALUES = 1 + 3 * 10 + len(MASK_ARGS) * 3 + 4  # the flag, query/value/key, masks and ids, call flags


def _mask_signature(m) -> tuple[int, int, int, str]:
    """`(ndim, shape hash, dtype kind, shape text)` of a mask argument; ndim -1 for None.

    Python hashes tuples of ints the same in every process, so equal shapes
    give equal hashes on every rank.
    """
    if m is None:
        return -1, 0, -1, "None"
    if is_pair(m):
        shape = (tuple(np.shape(m[0])), tuple(np.shape(m[1])))  # segment ids of query and keys
        return 2, hash(shape) & ((1 << 62) - 1), 1, str(shape)
    shape = tuple(np.shape(m)) if isinstance(m, (torch.Tensor, np.ndarray, list, tuple)) else ("not an array",)
    dtype = getattr(m, "dtype", None)
    kind = 0 if dtype in (torch.bool, np.bool_) else 1 if "int" in str(dtype) else 2 if "float" in str(dtype) else 3
    return len(shape), hash(shape) & ((1 << 62) - 1), kind, str(shape)


def check_tp_call(layer, query, value, key, masks, return_scores, causal, dropout, cache_length=-1,
                  local_error=None, wait=True):
    """Under TP: one small all-reduce proving every rank passes the same shapes, dtypes and flags.

    It completes before any collective of the call, so a rank whose inputs
    differ (a mask of another shape, a wrong feature dim, a float64 input)
    makes every rank raise a ValueError instead of one raising while the
    others wait in the output all-reduce. `local_error`: the ValueError this
    rank's own input checks raised; it is re-raised here, after the other
    ranks learned of it. `wait=False` returns the check in flight (an object
    with `wait()`, which raises as this function would): the caller overlaps
    its local work with the round trip and waits before its first collective.
    """
    if not layer.check_ranks or not layer._check_groups:
        return None
    if local_error is not None:
        for group in layer._check_groups:
            try:
                agreement.check_ranks_agree(group, [1] + [0] * (_CHECK_VALUES - 1),
                                           ["inputs rejected"] + ["-"] * (_CHECK_VALUES - 1))
            except ValueError:
                pass  # some ranks passed their checks; they raise their own message
        raise local_error
    values, names, shown = [0], ["inputs rejected"], ["no"]
    for name, x in (("query", query), ("value", value), ("key", key)):
        if x.dim() > 8:
            raise ValueError(f"Under tensor parallelism `{name}` may have at most 8 dims. Received: {name}.shape={tuple(x.shape)}")
        dims = list(x.shape) + [0] * (8 - x.dim())
        values += [x.dim(), *dims, FLOAT_DTYPES.index(x.dtype)]
        names += [f"{name}.ndim", *[f"{name}.shape[{i}]" for i in range(8)], f"{name}.dtype"]
        shown += [str(x.dim()), *[str(d) for d in dims], str(x.dtype).replace("torch.", "")]
    for name, m in zip(MASK_ARGS, masks):
        ndim, shape_hash, kind, text = _mask_signature(m)
        values += [ndim, shape_hash, kind]
        names += [f"{name}.ndim", f"{name}.shape", f"{name}.dtype"]
        shown += [str(ndim), text, "none" if kind < 0 else _MASK_DTYPES[kind]]
    values += [int(return_scores), int(causal), int(dropout), cache_length]
    names += ["return_attention_scores", "use_causal_mask", "dropout active", "cache.length"]
    shown += [str(bool(return_scores)), str(bool(causal)), str(bool(dropout)), str(cache_length)]
    assert len(values) == _CHECK_VALUES
    if wait:
        first = None
        for group in layer._check_groups:  # TP, then CP: every rank takes part in both before raising
            try:
                agreement.check_ranks_agree(group, values, names, shown)
            except ValueError as err:
                first = first or err
        if first is not None:
            _explain_disagreement(first)
        return None
    return _PendingCheck([agreement.start_ranks_agree(g, values, names, shown) for g in layer._check_groups])


def _explain_disagreement(err: ValueError):
    if "inputs rejected" in str(err).split("(")[0]:
        raise ValueError(
            "Another rank of the tensor- or context-parallel group rejected its inputs to this layer (its "
            "ValueError says why); this rank's inputs passed the checks. Every rank must call the layer with "
            "the same shapes and arguments."
        ) from None
    raise err


class _PendingCheck:
    """The rank checks in flight (one per group: TP, then CP)."""

    def __init__(self, agreements):
        self.agreements = agreements

    def wait(self) -> None:
        first = None
        for pending in self.agreements:  # every check completes before any raises
            try:
                pending.wait()
            except ValueError as err:
                first = first or err
        if first is not None:
            _explain_disagreement(first)


def _as_tensors(query, value, key) -> list:
    """`[query, value, key or None]` as floating tensors of rank >= 3, checked in Keras's order."""
    tensors = []
    for name, x in (("query", query), ("value", value), ("key", key)):
        if x is None:
            if name != "key":
                raise ValueError(f"Received an invalid value for argument `{name}`, expected a tensor. Received: {name}=None")
            tensors.append(None)
            continue
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"Received an invalid value for argument `{name}`, expected a torch.Tensor or numpy array. Received: {name} of type {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"Received an invalid value for argument `{name}`, expected a floating tensor "
                f"(float16, bfloat16, float32, float64). Received: {name}.dtype={x.dtype}"
            )
        tensors.append(x)
    value, key = tensors[1], tensors[2] if tensors[2] is not None else tensors[1]
    if value.shape[:-1] != key.shape[:-1]:  # Keras checks this first (a key of another rank included)
        raise ValueError(
            "All dimensions of `value` and `key`, except the last one, must be equal. "
            f"Received: value.shape={tuple(value.shape)} and key.shape={tuple(key.shape)}"
        )
    for name, x in zip(("query", "value", "key"), tensors):
        if x is not None and x.dim() < 3:
            raise ValueError(
                f"Received an invalid value for argument `{name}`, expected a tensor of rank >= 3 "
                f"(batch, ..., features). Received: {name}.shape={tuple(x.shape)}"
            )
    return tensors


def _check_against_layer(layer, query, value, key) -> None:
    """The inputs fit the built layer: rank, feature sizes, batch dims, device."""
    dq, dv, dk, rank = layer._built_dims
    for name, x, d in (("query", query, dq), ("value", value, dv), ("key", key, dk)):
        if x.dim() != rank or x.shape[-1] != d:
            raise ValueError(
                f"Received an invalid value for argument `{name}`: the layer was built for rank-{rank} "
                f"inputs with {d} features, got shape {tuple(x.shape)}. Build a new layer for other shapes."
            )
    for d in (d for d in range(rank - 1) if d not in layer._attention_axes):
        if query.shape[d] != value.shape[d]:
            raise ValueError(
                f"`query` and `value` must agree on dim {d} (a batch or non-attention dim). "
                f"Received: query.shape={tuple(query.shape)}, value.shape={tuple(value.shape)}"
            )
    kernel = layer._modules["query"].kernel
    if kernel.device != query.device:
        raise ValueError(f"Inputs are on {query.device} but the layer's weights are on {kernel.device}; move one of them (layer.to(device)).")


def check_inputs(layer, query, value, key):
    """Converts and validates `query`, `value`, `key`; builds the layer on first use."""
    tensors = _as_tensors(query, value, key)
    compute = getattr(layer, "_compute_dtype", None)
    if compute is not None:
        # A Keras mixed policy casts floating inputs to its compute dtype (once per
        # distinct tensor: self-attention stays one tensor).
        cast = {}
        tensors = [None if x is None else cast.setdefault(id(x), x.to(compute)) for x in tensors]
    query, value, key = tensors
    key = value if key is None else key
    for name, x in (("value", value), ("key", key)):
        if x.dtype != query.dtype or x.device != query.device:
            raise ValueError(
                f"`{name}` must have the query's dtype and device. Received: query {query.dtype} on "
                f"{query.device}, {name} {x.dtype} on {x.device}"
            )
    if not layer.built:
        if layer._device is None:
            layer._device = query.device
        layer.build(tuple(query.shape), tuple(value.shape), tuple(key.shape))
    _check_against_layer(layer, query, value, key)
    return query, value, key

"""Checks on the inputs of one `MultiHeadAttention` call.

Every check runs before any collective, so a bad input raises a ValueError
naming it instead of surfacing as a hang or a crash inside gloo/NCCL.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_mha.parallel import sharding

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tp_call(layer, query, value, key, masks, return_scores, causal, dropout):
    """Under TP: one small all-reduce proving every rank passes the same shapes and flags."""
    if not layer.check_ranks:
        return
    values, names = [], []
    for name, x in (("query", query), ("value", value), ("key", key)):
        if x.dim() > 8:
            raise ValueError(f"Under tensor parallelism `{name}` may have at most 8 dims. Received: {name}.shape={tuple(x.shape)}")
        dims = list(x.shape) + [0] * (8 - x.dim())
        values += [x.dim(), *dims, FLOAT_DTYPES.index(x.dtype)]
        names += [f"{name}.ndim", *[f"{name}.shape[{i}]" for i in range(8)], f"{name}.dtype"]
    for name, m in zip(("query_mask", "value_mask", "key_mask", "attention_mask"), masks):
        values.append(-1 if m is None else int(np.prod(np.shape(m))))
        names.append(f"{name}.numel")
    values += [int(return_scores), int(causal), int(dropout)]
    names += ["return_attention_scores", "use_causal_mask", "dropout active"]
    sharding.check_ranks_agree(layer._check_group, values, names)

def check_inputs(layer, query, value, key):
    """Converts and validates `query`, `value`, `key`; builds the layer on first use."""
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
        if x.dim() < 3:
            raise ValueError(
                f"Received an invalid value for argument `{name}`, expected a tensor of rank >= 3 "
                f"(batch, ..., features). Received: {name}.shape={tuple(x.shape)}"
            )
        tensors.append(x)
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
    dq, dv, dk, rank = layer._built_dims
    for name, x, d in (("query", query, dq), ("value", value, dv), ("key", key, dk)):
        if x.dim() != rank or x.shape[-1] != d:
            raise ValueError(
                f"Received an invalid value for argument `{name}`: the layer was built for rank-{rank} "
                f"inputs with {d} features, got shape {tuple(x.shape)}. Build a new layer for other shapes."
            )
    if value.shape[:-1] != key.shape[:-1]:
        raise ValueError(
            "All dimensions of `value` and `key`, except the last one, must be equal. "
            f"Received: value.shape={tuple(value.shape)} and key.shape={tuple(key.shape)}"
        )
    batch_dims = [d for d in range(rank - 1) if d not in layer._attention_axes]
    for d in batch_dims:
        if query.shape[d] != value.shape[d]:
            raise ValueError(
                f"`query` and `value` must agree on dim {d} (a batch or non-attention dim). "
                f"Received: query.shape={tuple(query.shape)}, value.shape={tuple(value.shape)}"
            )
    kernel = layer._modules["query"].kernel
    if kernel.device != query.device:
        raise ValueError(f"Inputs are on {query.device} but the layer's weights are on {kernel.device}; move one of them (layer.to(device)).")
    return query, value, key

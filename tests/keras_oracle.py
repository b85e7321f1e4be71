"""Runs real Keras 3 (torch backend) and dist_mha side by side from the same weights."""

from __future__ import annotations

import numpy as np
import torch

from dist_mha import GroupQueryAttention, MultiHeadAttention


def keras():
    import pytest

    return pytest.importorskip("keras", minversion="3.15")


def make_pair(layer_kwargs, query_shape, value_shape, key_shape=None, dtype=torch.float32, layer="MultiHeadAttention",
              **torch_kwargs):
    """A built Keras layer and a dist_mha layer holding the Keras layer's weights.

    `layer`: "MultiHeadAttention" or "GroupQueryAttention" (the same name on both sides).
    """
    k = keras()
    k_layer = getattr(k.layers, layer)(**layer_kwargs)
    k_layer.build(query_shape, value_shape, key_shape)
    ours = {"MultiHeadAttention": MultiHeadAttention, "GroupQueryAttention": GroupQueryAttention}[layer](
        **layer_kwargs, query_shape=query_shape, value_shape=value_shape, key_shape=key_shape, dtype=dtype, **torch_kwargs
    )
    ours.set_weights(k_layer.get_weights())
    return k_layer, ours


def keras_call(k_layer, query, value, key=None, query_mask=None, **call_kwargs):
    """Calls Keras; `query_mask` is attached to the tensor, the only way Keras 3.15 reads it."""
    from keras.src import backend

    q = torch.as_tensor(query)
    if query_mask is not None:
        q = q.clone()
        backend.set_keras_mask(q, torch.as_tensor(query_mask))
    out = k_layer(q, torch.as_tensor(value), None if key is None else torch.as_tensor(key), **call_kwargs)
    if isinstance(out, tuple):
        return tuple(np.asarray(o.detach().cpu()) for o in out)
    return np.asarray(out.detach().cpu())

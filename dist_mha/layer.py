"""`MultiHeadAttention`: Keras 3's layer as a `torch.nn.Module`.

Shape legend: B batch, T/S query/key positions (after layout.py folds
multi-axis attention), N heads, H key_dim, Hv value_dim, Dq/Dk/Dv input
features.

One call, top to bottom: check inputs -> build on first use -> project
q/k/v (Keras-layout kernels) -> fold to `*_BTNH` -> merge masks -> local
kernel (flash-attn / SDPA / math) with dropout under the layer's RNG stream
-> unfold -> [gate] -> output projection.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dist_mha import config as cfg
from dist_mha import constraints, initializers, regularizers
from dist_mha.keras_api import KerasLayerAPI
from dist_mha.kernels import AttentionRequest, attention
from dist_mha.layout import AttentionLayout, normalize_attention_axes
from dist_mha.masks import build_mask_spec
from dist_mha.projections import EinsumProjection, projection_equation
from dist_mha.rng_streams import RNGStream

# Stable per-weight salts: each kernel (and bias) gets its own random draw,
# independent of build order and of the other weights' shapes.
_SALTS = {"query": 1, "key": 2, "value": 3, "attention_output": 4, "gate": 5}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MultiHeadAttention(KerasLayerAPI, nn.Module):
    """Multi-head attention with the API and numerics of Keras 3's `MultiHeadAttention`.

    Projects `query`, `key` and `value` into `num_heads` heads, takes the
    scaled dot product of queries and keys (scale `1/sqrt(key_dim)`),
    softmaxes it jointly over `attention_axes`, applies dropout to the
    probabilities, combines the values, and projects back to `output_shape`
    (default: the query's feature size). The local attention runs on
    flash-attn, torch SDPA or an exact math path, whichever is fastest for the
    input (see `flash_attention` and `attention_backend`).

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each attention head for query and key.
        value_dim: Size of each attention head for value; defaults to `key_dim`.
        dropout: Dropout probability on the attention probabilities.
        use_bias: Whether the dense projections use biases.
        output_shape: Int or tuple, the output's trailing shape; defaults to
            the query's feature size.
        attention_axes: Axes (int or tuple, negatives allowed) over which
            attention is applied; `None` means every axis but batch and features.
        sliding_window: Optional positive int: each query attends only to keys
            within `sliding_window - 1` positions of itself.
        flash_attention: `None` picks the fastest backend that supports the
            call; `True` requires the flash-attn package (ValueError otherwise,
            listing why each backend refused); `False` never uses flash-attn.
        kernel_initializer, bias_initializer: Keras initializer names, configs
            or objects (see `dist_mha.initializers`).
        kernel_regularizer, bias_regularizer, activity_regularizer: Keras
            regularizers; penalties appear in `layer.losses`.
        kernel_constraint, bias_constraint: Keras constraints, applied by
            `apply_constraints()` or an optimizer hook (`constraint_hook`).
        use_gate: Gated attention: the output is multiplied by
            `sigmoid(gate_dense(query))` before the output projection.
        seed: Seed for the dropout stream; same seed, same masks, and
            successive calls differ. `None` uses torch's global RNG.
        query_shape, value_shape, key_shape: keyword-only (torch extra): build
            eagerly from these shapes (an int means `(None, None, features)`),
            so parameters exist before an optimizer is created.
        attention_backend: keyword-only (torch extra): force "flash", "sdpa"
            or "math".
        device, dtype: keyword-only: where and in which dtype the weights
            live. `dtype` also takes Keras policy names/configs.
        tp_group: keyword-only, reserved for tensor parallelism; must be None.
        name, trainable: as Keras's base layer.

    Call arguments:
        query: `(B, T, Dq)` (or `(B, ..., Dq)` for multi-axis attention).
        value: `(B, S, Dv)`.
        key: optional `(B, S, Dk)`; defaults to `value`.
        query_mask: optional `(B, T)`; False rows are masked (their context is zero).
        value_mask, key_mask: optional `(B, S)`; False keys are not attended.
        attention_mask: optional bool `(B, T, S)` (or broadcastable to the
            scores); True means attend.
        return_attention_scores: also return the pre-dropout probabilities.
        training: None follows `self.training` (torch convention); a bool forces it.
        use_causal_mask: top-left aligned causal mask (query i sees keys j <= i).

    Returns:
        `attention_output` of shape `(B, T, *output_shape)`, and with
        `return_attention_scores=True` also the scores `(B, N, T, S)` (Keras's
        layout for other ranks, e.g. `(B, X, N, T, S)`).

    Raises:
        ValueError: on any invalid argument or input, naming it.

    Example:

    >>> mha = MultiHeadAttention(num_heads=4, key_dim=16, query_shape=64)
    >>> x = torch.randn(2, 10, 64)
    >>> mha(x, x, use_causal_mask=True).shape
    torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        attention_axes=None,
        sliding_window=None,
        flash_attention=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        use_gate=False,
        seed=None,
        *,
        query_shape=None,
        value_shape=None,
        key_shape=None,
        attention_backend=None,
        device=None,
        dtype=None,
        tp_group=None,
        name=None,
        trainable=True,
        **kwargs,
    ):
        super().__init__()
        kwargs.pop("autocast", None)  # Keras base-layer flag; torch.autocast governs here.
        if kwargs:
            raise ValueError(
                f"Unrecognized keyword arguments passed to MultiHeadAttention: {kwargs}. "
                "See the class docstring for the accepted arguments."
            )
        self._num_heads = cfg.positive_int("num_heads", num_heads)
        self._key_dim = cfg.positive_int("key_dim", key_dim)
        self._value_dim = cfg.positive_int("value_dim", value_dim, allow_none=True) or self._key_dim
        self._dropout = cfg.dropout_rate(dropout)
        self._use_bias = cfg.boolean("use_bias", use_bias)
        self._output_shape = cfg.output_shape(output_shape)
        self._attention_axes = cfg.attention_axes(attention_axes)
        self._sliding_window = cfg.positive_int("sliding_window", sliding_window, allow_none=True)
        self._flash_attention = cfg.flash_attention(flash_attention)
        self._use_gate = cfg.boolean("use_gate", use_gate)
        self.seed = cfg.seed(seed)
        self._attention_backend = cfg.attention_backend(attention_backend)
        self._kernel_initializer = initializers.get(kernel_initializer, "kernel_initializer")
        self._bias_initializer = initializers.get(bias_initializer, "bias_initializer")
        self._kernel_regularizer = regularizers.get(kernel_regularizer, "kernel_regularizer")
        self._bias_regularizer = regularizers.get(bias_regularizer, "bias_regularizer")
        self._activity_regularizer = regularizers.get(activity_regularizer, "activity_regularizer")
        self._kernel_constraint = constraints.get(kernel_constraint, "kernel_constraint")
        self._bias_constraint = constraints.get(bias_constraint, "bias_constraint")
        if self._kernel_initializer is None or self._bias_initializer is None:
            which = "kernel_initializer" if self._kernel_initializer is None else "bias_initializer"
            raise ValueError(f"Received an invalid value for argument `{which}`, expected an initializer. Received: {which}=None")
        if tp_group is not None:
            raise ValueError(
                "Received an invalid value for argument `tp_group`: tensor parallelism is not "
                f"available in this version; pass tp_group=None. Received: tp_group={tp_group!r}"
            )
        self.tp_group = None
        self.name = name or "multi_head_attention"
        self._param_dtype = cfg.param_dtype(dtype)
        self._device = torch.device(device) if device is not None else None
        self._inverse_sqrt_key_dim = 1.0 / math.sqrt(float(self._key_dim))
        self._dropout_stream = RNGStream(self.seed, "attention_dropout") if self.seed is not None else None
        self._trainable = cfg.boolean("trainable", trainable)
        self._activity_losses: list[torch.Tensor] = []
        self.built = False
        self.last_backend: str | None = None
        self.last_backend_reason: str | None = None
        if query_shape is not None:
            self.build(query_shape, value_shape if value_shape is not None else query_shape, key_shape)
        elif value_shape is not None or key_shape is not None:
            raise ValueError("Received `value_shape`/`key_shape` without `query_shape`; pass query_shape too to build eagerly.")

    # -- Keras read-only properties ------------------------------------------
    num_heads = property(lambda self: self._num_heads)
    key_dim = property(lambda self: self._key_dim)
    value_dim = property(lambda self: self._value_dim)
    dropout = property(lambda self: self._dropout)
    use_bias = property(lambda self: self._use_bias)
    attention_axes = property(lambda self: self._attention_axes)
    query_dense = property(lambda self: self._sub("query"))
    key_dense = property(lambda self: self._sub("key"))
    value_dense = property(lambda self: self._sub("value"))
    output_dense = property(lambda self: self._sub("attention_output"))

    def _sub(self, name):
        if not self.built:
            raise AttributeError(f"`{name}` dense layer exists after build(); call build() or the layer first.")
        return self._modules[name]

    # -- build ----------------------------------------------------------------
    def build(self, query_shape, value_shape, key_shape=None):
        """Creates the weights.

        Optimizers must be created after this (or after the first call), since
        torch optimizers bind to existing parameters; pass `query_shape=` to the
        constructor to build eagerly.

        Args:
            query_shape: `(B, ..., Dq)`; None for unknown dims.
            value_shape: `(B, ..., Dv)`.
            key_shape: optional `(B, ..., Dk)`; defaults to `value_shape`.
        """
        if self.built:
            raise ValueError(f"Layer '{self.name}' is already built; create a new layer to change its input shapes.")
        query_shape = cfg.input_shape("query_shape", query_shape)
        value_shape = cfg.input_shape("value_shape", value_shape)
        key_shape = value_shape if key_shape is None else cfg.input_shape("key_shape", key_shape)
        if value_shape[1:-1] != key_shape[1:-1]:
            raise ValueError(
                "All dimensions of `value` and `key`, except the last one, must be equal. "
                f"Received: value_shape={value_shape} and key_shape={key_shape}"
            )
        if not len(query_shape) == len(value_shape):
            raise ValueError(
                "`query` and `value` must have the same rank. "
                f"Received: query_shape={query_shape} and value_shape={value_shape}"
            )
        rank = len(query_shape)
        self._attention_axes = normalize_attention_axes(self._attention_axes, rank)
        N, H, Hv = self._num_heads, self._key_dim, self._value_dim
        out = self._output_shape or (query_shape[-1],)
        in_eq = projection_equation(rank - 1, 1, 2)
        specs = [("query", (query_shape[-1],), (N, H), in_eq, None), ("key", (key_shape[-1],), (N, H), in_eq, None)]
        if self._use_gate:
            specs.append(("gate", (query_shape[-1],), (N, Hv), in_eq, "sigmoid"))
        specs.append(("value", (value_shape[-1],), (N, Hv), in_eq, None))
        specs.append(("attention_output", (N, Hv), out, projection_equation(rank - 1, 2, len(out)), None))
        for name, in_dims, out_dims, eq, act in specs:
            proj = EinsumProjection(
                name, in_dims, out_dims, self._use_bias, eq, activation=act, dtype=self._param_dtype, device=self._device
            )
            self.add_module(name, proj)
            self._initialize(proj)
        self._built_dims = (query_shape[-1], value_shape[-1], key_shape[-1], rank)
        self.built = True
        self.trainable = self._trainable

    def _initialize(self, proj: EinsumProjection) -> None:
        fan_in, fan_out = math.prod(proj.in_dims), math.prod(proj.out_dims)
        salt = _SALTS[proj.name]
        with torch.no_grad():
            kernel = self._kernel_initializer(
                tuple(proj.kernel.shape), proj.kernel.dtype, device=proj.kernel.device,
                fan_in=fan_in, fan_out=fan_out, salt=salt,
            )
            proj.kernel.copy_(torch.as_tensor(kernel))
            if proj.bias is not None:
                bias = self._bias_initializer(
                    tuple(proj.bias.shape), proj.bias.dtype, device=proj.bias.device, salt=100 + salt
                )
                proj.bias.copy_(torch.as_tensor(bias))

    # -- call -------------------------------------------------------------------
    def forward(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        query, value, key = self._check_inputs(query, value, key)
        return_attention_scores = cfg.boolean("return_attention_scores", return_attention_scores)
        use_causal_mask = cfg.boolean("use_causal_mask", use_causal_mask)
        if training is not None:
            training = cfg.boolean("training", training)
        training = self.training if training is None else training

        q = self.query_dense(query)  # (B, d.., N, H)
        k = self.key_dense(key)
        v = self.value_dense(value)  # (B, d.., N, Hv)
        gate = self._modules["gate"](query) if self._use_gate else None
        layout = AttentionLayout(query.dim(), self._attention_axes)
        scores_shape = (
            *[q.shape[d] for d in layout.batch_dims],
            self._num_heads,
            *[q.shape[d] for d in layout.attention_axes],
            *[k.shape[d] for d in layout.attention_axes],
        )
        masks = build_mask_spec(
            layout, query.shape, value.shape, scores_shape,
            query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
            attention_mask=attention_mask, use_causal_mask=use_causal_mask,
            sliding_window=self._sliding_window, device=query.device,
        )
        dropout_p = self._dropout if training else 0.0
        req = AttentionRequest(
            layout.to_BTNH(q), layout.to_BTNH(k), layout.to_BTNH(v), masks,
            self._inverse_sqrt_key_dim, dropout_p, return_attention_scores,
        )
        if dropout_p > 0 and self._dropout_stream is not None:
            with self._dropout_stream.fork(query.device):
                out_BTNH, probs, self.last_backend, self.last_backend_reason = attention(
                    req, self._flash_attention, self._attention_backend
                )
        else:
            out_BTNH, probs, self.last_backend, self.last_backend_reason = attention(
                req, self._flash_attention, self._attention_backend
            )
        context = layout.from_BTNH(out_BTNH, q.shape)  # (B, d.., N, Hv)
        if gate is not None:
            context = context * gate
        output = self.output_dense(context)
        self._record_activity(q, k, gate, v, output)
        if return_attention_scores:
            return output, layout.scores_from_BNTS(probs, q.shape, k.shape)
        return output

    def _check_inputs(self, query, value, key):
        tensors = []
        for name, x in (("query", query), ("value", value), ("key", key)):
            if x is None:
                tensors.append(None)
                continue
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"Received an invalid value for argument `{name}`, expected a torch.Tensor or numpy array. Received: {name} of type {type(x).__name__}")
            if x.dtype not in _FLOAT_DTYPES:
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
        if not self.built:
            if self._device is None:
                self._device = query.device
            self.build(tuple(query.shape), tuple(value.shape), tuple(key.shape))
        dq, dv, dk, rank = self._built_dims
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
        batch_dims = [d for d in range(rank - 1) if d not in self._attention_axes]
        for d in batch_dims:
            if query.shape[d] != value.shape[d]:
                raise ValueError(
                    f"`query` and `value` must agree on dim {d} (a batch or non-attention dim). "
                    f"Received: query.shape={tuple(query.shape)}, value.shape={tuple(value.shape)}"
                )
        if self.query_dense.kernel.device != query.device:
            raise ValueError(f"Inputs are on {query.device} but the layer's weights are on {self.query_dense.kernel.device}; move one of them (layer.to(device)).")
        return query, value, key

    def _record_activity(self, q, k, gate, v, output) -> None:
        self._activity_losses = []
        reg = self._activity_regularizer
        if reg is None:
            return
        # Keras regularises each sublayer's output, divided by its batch size.
        for y in (q, k, gate, v, output):
            if y is not None:
                self._activity_losses.append(reg(y) / y.shape[0])

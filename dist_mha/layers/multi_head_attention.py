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
from contextlib import nullcontext as _nullcontext

import torch
from torch import nn

from dist_mha.core import inputs, projections
from dist_mha.core.fused_projection import project
from dist_mha.core.kernels import AttentionRequest, attention
from dist_mha.core.layout import AttentionLayout, normalize_attention_axes
from dist_mha.core.masks import build_mask_spec
from dist_mha.core.rng_streams import (
    CallCounter,
    RNGStream,
    invariant_keep_mask,
    stream_seed,
)
from dist_mha.keras_objects import constraints, initializers, regularizers
from dist_mha.layers import config as cfg
from dist_mha.layers.keras_api import KerasLayerAPI
from dist_mha.parallel import region, sharding

_DROPOUT_MODES = ("per_rank", "tp_invariant")


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
            or objects (see `dist_mha.keras_objects.initializers`).
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
        tp_group: keyword-only: a `torch.distributed` process group over which
            heads are split (`num_heads % tp_size == 0`); None means no tensor
            parallelism. Every rank of the group calls the layer with the same
            (replicated) inputs.
        sequence_parallel: keyword-only: inputs and output are sharded on dim 1
            across `tp_group` (Megatron-style); masks are still given in full.
        dropout_mode: keyword-only: "per_rank" (default; each TP rank's heads
            draw from their own stream, fast, any backend) or "tp_invariant"
            (masks keyed by seed, call, global head and position: identical
            results at every TP degree; math backend only).
        check_ranks: keyword-only: under TP, one tiny all-reduce per call
            verifies that all ranks pass the same shapes and flags, so a
            mismatch raises instead of hanging. Default True.
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
        sequence_parallel=False,
        dropout_mode="per_rank",
        check_ranks=True,
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
        self.tp_group = cfg.process_group("tp_group", tp_group)
        self.tp_size = sharding.tp_size_of(self.tp_group)
        self.tp_rank = sharding.tp_rank_of(self.tp_group)
        sharding.check_heads_divisible(self._num_heads, self.tp_size)
        self.sequence_parallel = cfg.boolean("sequence_parallel", sequence_parallel)
        if dropout_mode not in _DROPOUT_MODES:
            raise ValueError(f"Received an invalid value for argument `dropout_mode`, expected one of {_DROPOUT_MODES}. Received: dropout_mode={dropout_mode!r}")
        self.dropout_mode = dropout_mode
        self.check_ranks = cfg.boolean("check_ranks", check_ranks)
        self._check_group = sharding.cpu_group(self.tp_group) if self.check_ranks and self.tp_size > 1 else None
        self.name = name or "multi_head_attention"
        self._param_dtype = cfg.param_dtype(dtype)
        self._device = torch.device(device) if device is not None else None
        self._inverse_sqrt_key_dim = 1.0 / math.sqrt(float(self._key_dim))
        self._dropout_stream = None  # created at build, when the TP rank's seed is known
        self.replicated_stream = None
        self._invariant_calls = None
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
        base = sharding.agreed_random_base(self.tp_group, self._device)
        for proj in projections.build_projections(self, query_shape[-1], value_shape[-1], key_shape[-1], rank):
            self.add_module(proj.name, proj)
            projections.initialize(proj, self._kernel_initializer, self._bias_initializer, base, self._num_heads,
                                   self.tp_group)
        self._make_streams(base)
        self._built_dims = (query_shape[-1], value_shape[-1], key_shape[-1], rank)
        self.built = True
        self.trainable = self._trainable

    def _make_streams(self, base: int) -> None:
        seed = self.seed if self.seed is not None else base
        if self.seed is not None or self.tp_size > 1:
            # seed=None at TP=1 keeps Keras's meaning: torch's global RNG. Under
            # TP the per-rank stream needs a seed; `base` follows torch.manual_seed.
            self._dropout_stream = RNGStream(stream_seed(seed, "attention_dropout", self.tp_rank), "attention_dropout")
        self.replicated_stream = RNGStream(stream_seed(seed, "replicated"), "replicated")
        self._invariant_calls = CallCounter(stream_seed(seed, "invariant_dropout"))

    def rng_streams(self) -> list:
        """The layer's RNG streams (for `dist_mha.core.rng_streams.checkpoint`)."""
        return [s for s in (self._dropout_stream, self.replicated_stream, self._invariant_calls) if s is not None]

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
        *,
        local_scores=False,
    ):
        query, value, key = inputs.check_inputs(self, query, value, key)
        return_attention_scores = cfg.boolean("return_attention_scores", return_attention_scores)
        use_causal_mask = cfg.boolean("use_causal_mask", use_causal_mask)
        if training is not None:
            training = cfg.boolean("training", training)
        training = self.training if training is None else training
        dropout_p = self._dropout if training else 0.0
        group, sp = self.tp_group, self.sequence_parallel
        if self.tp_size > 1:
            inputs.check_tp_call(self, query, value, key, [query_mask, value_mask, key_mask, attention_mask],
                                return_attention_scores, use_causal_mask, dropout_p > 0)
            query, value, key = region.enter(group, sp, query, value, key)

        q, k, gate, v = project(self._self_projections(), query, key, value)  # (B, d.., n, H|Hv), n = local heads
        layout = AttentionLayout(query.dim(), self._attention_axes)
        batch = [q.shape[d] for d in layout.batch_dims]
        t_dims = [q.shape[d] for d in layout.attention_axes]
        s_dims = [k.shape[d] for d in layout.attention_axes]
        masks = build_mask_spec(
            layout, query.shape, value.shape, (*batch, self._num_heads, *t_dims, *s_dims),
            query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
            attention_mask=attention_mask, use_causal_mask=use_causal_mask,
            sliding_window=self._sliding_window, device=query.device,
        )
        h0, h1 = sharding.head_range(self._num_heads, group)
        if masks.dense_BNTS is not None and masks.dense_BNTS.shape[1] == self._num_heads != h1 - h0:
            masks.dense_BNTS = masks.dense_BNTS[:, h0:h1]  # a per-head mask: keep this rank's heads
        req = AttentionRequest(
            layout.to_BTNH(q), layout.to_BTNH(k), layout.to_BTNH(v), masks,
            self._inverse_sqrt_key_dim, dropout_p, return_attention_scores,
        )
        stream = None
        if dropout_p > 0 and self.dropout_mode == "tp_invariant":
            call = self._invariant_calls.next()
            seed, rate = self._invariant_calls.seed, dropout_p

            def keep(shape_BNTS, device):
                global_shape = (shape_BNTS[0], self._num_heads, *shape_BNTS[2:])
                return invariant_keep_mask(seed, call, global_shape, (slice(None), slice(h0, h1)), rate, device)

            req.dropout_keep = keep
        elif dropout_p > 0:
            stream = self._dropout_stream
        with stream.fork(query.device) if stream is not None else _nullcontext():
            out_BTNH, probs, backend, why = attention(req, self._flash_attention, self._attention_backend)
        # Plain attributes, set without nn.Module.__setattr__'s per-call bookkeeping.
        self.__dict__["last_backend"], self.__dict__["last_backend_reason"] = backend, why
        context = layout.from_BTNH(out_BTNH, q.shape)  # (B, d.., n, Hv)
        if gate is not None:
            context = context * gate
        out_proj = self.output_dense
        if self.tp_size > 1:
            output = region.leave(group, sp, out_proj(context, add_bias=False), out_proj.bias)
        else:
            output = out_proj(context)
        self._record_activity(q, k, gate, v, output)
        if not return_attention_scores:
            return output
        scores = layout.scores_from_BNTS(probs, q.shape, k.shape)
        if not local_scores:
            scores = sharding.gather_full(scores, len(layout.batch_dims), group)
        return output, scores

    def _self_projections(self):
        return [self.query_dense, self.key_dense, self._modules.get("gate"), self.value_dense]

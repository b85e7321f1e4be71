"""The attention engine under `MultiHeadAttention` and `GroupQueryAttention`.

Shape legend: B batch, T/S query/key positions (after layout.py folds
multi-axis attention), N query heads, K key/value heads (K == N for
multi-head attention; query head i reads key/value head i // (N / K)),
H key_dim, Hv value_dim, Dq/Dk/Dv input features; lower case n/k are this
tensor-parallel rank's heads.

One call is a sequence of stages (`stages.py`), each one call in `forward`:
validate (and start the rank-agreement check) -> enter the TP region ->
masks (global positions) -> project q/k/v (Keras-layout kernels; only the
tokens anyone attends to, when padding allows) -> [QK-norm] -> [rotary
positions] -> append to the KV cache ->
attend (a local kernel, or ring/Ulysses context parallelism; dropout under
the layer's RNG stream) -> gate and output projection, leaving the TP
region -> results. Both Keras layers are thin constructors over this one
forward: multi-head attention is the `K == N` case. The Keras objects
(initializers, regularizers, constraints) arrive resolved from the layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_mha.attention.kv_cache import KVCache
from dist_mha.attention.layout import normalize_attention_axes
from dist_mha.attention.rope import Rope
from dist_mha.engine import call, projections, stages
from dist_mha.engine import config as cfg
from dist_mha.engine.dropout import DropoutStreams
from dist_mha.parallel import agreement, groups, mesh
from dist_mha.parallel.cp import layout as cp_layout
from dist_mha.parallel.tp import placement, sharding

DROPOUT_MODES = ("per_rank", "tp_invariant")


class AttentionCore(DropoutStreams, nn.Module):
    """The engine: projections, masks, kernels, RNG streams and tensor parallelism.

    Subclasses (the Keras layers) validate their own head arguments and call
    `_init_core`; everything after that is shared. See
    `dist_mha.MultiHeadAttention` for the meaning of every argument.
    """

    def _init_core(
        self, *, layer_name, num_heads, num_kv_heads, key_dim, value_dim, output_shape, attention_axes, dropout,
        use_bias, sliding_window, flash_attention, kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint, bias_constraint, use_gate, seed, query_shape,
        value_shape, key_shape, attention_backend, device, dtype, tp_group, sequence_parallel, dropout_mode,
        check_ranks, name, trainable, kwargs, cp_group=None, cp_mode="ring", rope=None, qk_norm=None, qk_norm_eps=1e-6,
        logit_softcap=None, attention_sinks=False, scale=None, output_bias=None,
    ):
        kwargs.pop("autocast", None)  # Keras base-layer flag; torch.autocast governs here.
        if kwargs:
            raise ValueError(
                f"Unrecognized keyword arguments passed to {layer_name}: {kwargs}. "
                "See the class docstring for the accepted arguments."
            )
        self._num_heads, self._num_kv_heads = num_heads, num_kv_heads
        self._key_dim, self._value_dim = key_dim, value_dim
        self._output_shape, self._attention_axes = output_shape, attention_axes
        self._dropout = cfg.dropout_rate(dropout)
        self._use_bias = cfg.boolean("use_bias", use_bias)
        self._sliding_window = cfg.positive_int("sliding_window", sliding_window, allow_none=True)
        self._flash_attention = cfg.flash_attention(flash_attention)
        self._use_gate = cfg.boolean("use_gate", use_gate)
        self.seed = cfg.seed(seed)
        self._attention_backend = cfg.attention_backend(attention_backend)
        # Resolved by the layers: initializers are callables `(shape, dtype, *, device, fan_in, fan_out, salt,
        # base_seed, index)`, regularizers `(tensor) -> penalty`, constraints `(tensor) -> tensor`.
        self._kernel_initializer, self._bias_initializer = kernel_initializer, bias_initializer
        self._kernel_regularizer, self._bias_regularizer = kernel_regularizer, bias_regularizer
        self._activity_regularizer = activity_regularizer
        self._kernel_constraint, self._bias_constraint = kernel_constraint, bias_constraint
        self._init_parallel(tp_group, sequence_parallel, cp_group, cp_mode, dropout_mode, check_ranks)
        self.name = name or layer_name
        self._param_dtype = cfg.param_dtype(dtype)
        self._compute_dtype = cfg.compute_dtype(dtype)  # Keras mixed policies: inputs are cast to it
        self._device = torch.device(device) if device is not None else None
        self._init_features(rope, qk_norm, qk_norm_eps, logit_softcap, attention_sinks, scale, output_bias)
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
        elif self.tp_mesh is not None or self.cp_mesh is not None:
            raise ValueError(
                f"Received a DeviceMesh as `tp_group`/`cp_group` without `query_shape`: DTensor parameters must exist "
                f"before the first call (for fully_shard and the optimizer). Pass query_shape= to build {layer_name} "
                "eagerly.")

    def _init_features(self, rope, qk_norm, qk_norm_eps, logit_softcap, attention_sinks, scale, output_bias):
        """The extras of today's LLMs (rotary positions, QK-norm, soft-capping, sinks, a score scale), checked."""
        self._rope = None if rope is None else Rope.from_dict(rope, self._key_dim)
        if qk_norm not in (None, "rms"):
            raise ValueError(f"Received an invalid value for argument `qk_norm`, expected None or 'rms' (RMSNorm of "
                             f"each query and key head over key_dim). Received: qk_norm={qk_norm!r}")
        self._qk_norm = qk_norm
        self._qk_norm_eps = cfg.positive_float("qk_norm_eps", qk_norm_eps)
        self._logit_softcap = cfg.positive_float("logit_softcap", logit_softcap, allow_none=True)
        self._attention_sinks = cfg.boolean("attention_sinks", attention_sinks)
        self._scale_arg = cfg.positive_float("scale", scale, allow_none=True)
        self._scale = self._scale_arg if self._scale_arg is not None else 1.0 / math.sqrt(float(self._key_dim))
        self._output_bias = None if output_bias is None else cfg.boolean("output_bias", output_bias)

    def _init_parallel(self, tp_group, sequence_parallel, cp_group, cp_mode, dropout_mode, check_ranks):
        """The TP and CP groups and modes, checked before any collective."""
        # A DeviceMesh axis (state.mesh["tp"]) makes the parameters DTensors at build (parallel/dtensor.py).
        tp_group, self.tp_mesh, cp_group, self.cp_mesh = mesh.axes(tp_group, cp_group)
        self.tp_group = cfg.process_group("tp_group", tp_group)
        self.tp_size, self.tp_rank = groups.size_of(self.tp_group), groups.rank_of(self.tp_group)
        sharding.check_heads_divisible(self._num_heads, self.tp_size, self._num_kv_heads)
        self.sequence_parallel = cfg.boolean("sequence_parallel", sequence_parallel)
        if dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"Received an invalid value for argument `dropout_mode`, expected one of {DROPOUT_MODES}. Received: dropout_mode={dropout_mode!r}")
        self.dropout_mode = dropout_mode
        self.cp_group = cfg.process_group("cp_group", cp_group)
        self.cp_size, self.cp_rank = groups.size_of(self.cp_group), groups.rank_of(self.cp_group)
        self.cp_mode = cp_mode
        cp_layout.check_cp_layer(self, self.cp_group, cp_mode)
        self.check_ranks = cfg.boolean("check_ranks", check_ranks)
        # The rank-agreement check runs on gloo companions of the TP and CP groups.
        self._check_groups = [groups.cpu_group(g) for g, n in ((self.tp_group, self.tp_size),
                                                                 (self.cp_group, self.cp_size)) if n > 1]

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
        self._check_build_rank(len(query_shape))
        rank = len(query_shape)
        self._attention_axes = normalize_attention_axes(self._attention_axes, rank)
        base = agreement.agreed_random_base(self.tp_group, self.cp_group)
        for proj in projections.build_projections(self, query_shape[-1], value_shape[-1], key_shape[-1], rank):
            self.add_module(proj.name, proj)
            projections.initialize(proj, self._kernel_initializer, self._bias_initializer, base, self.tp_group)
        projections.build_extras(self)
        self._make_streams(base)
        if self.tp_mesh is not None or self.cp_mesh is not None:
            from dist_mha.parallel.dtensor import distribute

            distribute(self, self.tp_mesh, self.cp_mesh)
        self._built_dims = (query_shape[-1], value_shape[-1], key_shape[-1], rank)
        self.built = True
        self.trainable = self._trainable

    def _check_build_rank(self, rank: int) -> None:
        """Layers that take only some input ranks override this (and call this one)."""
        if self._rope is not None and rank != 3:
            raise ValueError(f"Received inputs of rank {rank} with `rope`: rotary positions take rank-3 inputs "
                             "(batch, seq, features). Drop `rope` or use rank-3 inputs.")

    def _sub(self, name):
        if not self.built:
            raise AttributeError(f"`{name}` dense layer exists after build(); call build() or the layer first.")
        return self._modules[name]

    def _projections(self):
        """`[query, key, gate or None, value]`."""
        return [self._modules["query"], self._modules["key"], self._modules.get("gate"), self._modules["value"]]

    def _projection_weights(self, projs):
        """`(kernel, bias)` per projection; replicated key/value heads enter through `copy_to_kv_replicas`."""
        key, value = projs[1], projs[3]
        if key.replicas == 1:
            return None
        synced = sharding.sync_replicas(self.tp_group, key.replicas, key.kernel, value.kernel,
                                        *([key.bias, value.bias] if self._use_bias else []))
        kk, vk, *biases = synced
        kb, vb = biases if biases else (None, None)
        return [None, (kk, kb), None, (vk, vb)]

    @placement.on_local_params()
    def init_cache(self, batch_size: int, max_length: int, *, dtype=None, device=None) -> KVCache:
        """An empty `KVCache` for this layer's (this rank's) key/value heads.

        Args:
            batch_size: rows decoded together.
            max_length: the most positions (prompt + generated) it will hold.
            dtype, device: of the buffers; default the weights' (the compute
                dtype when the layer runs in another precision).

        Example:

        >>> cache = layer.init_cache(batch_size=2, max_length=64)
        >>> y = layer(prompt, prompt, use_causal_mask=True, cache=cache)   # prefill
        >>> y = layer(tok, tok, use_causal_mask=True, cache=cache)         # one step
        """
        if not self.built:
            raise ValueError(f"Layer '{self.name}' is not built; build it (query_shape=...) before init_cache().")
        key = self._modules["key"]
        return KVCache(batch_size, max_length, key.kernel.shape[1], self._key_dim, self._value_dim,
                       dtype=dtype or self._compute_dtype or key.kernel.dtype, device=device or key.kernel.device)

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
        cache=None,
        segment_ids=None,
        position_ids=None,
    ):
        mask_args = dict(query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
                         attention_mask=attention_mask, segment_ids=segment_ids, position_ids=position_ids)
        c = call.validate(self, query, value, key, mask_args, return_attention_scores, training, use_causal_mask,
                          cache, local_scores)
        stages.enter_region(self, c)
        stages.masks(self, c)
        stages.project(self, c)
        stages.normalize_qk(self, c)
        stages.rotate(self, c)
        stages.append_to_cache(self, c)
        stages.attend(self, c)
        stages.project_output(self, c)
        return stages.results(self, c)

    def _record_activity(self, q, k, gate, v, output, scores=None, scores_head_dim=None) -> None:
        """Keras's activity penalties of a call; the Keras layers record them (`KerasLayerAPI`)."""

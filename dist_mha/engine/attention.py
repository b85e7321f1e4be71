"""The attention engine under `MultiHeadAttention` and `GroupQueryAttention`.

Shape legend: B batch, T/S query/key positions (after layout.py folds
multi-axis attention), N query heads, K key/value heads (K == N for
multi-head attention; query head i reads key/value head i // (N / K)),
H key_dim, Hv value_dim, Dq/Dk/Dv input features; lower case n/k are this
tensor-parallel rank's heads.

One call, top to bottom (`call.py` holds the steps before the kernel): check
inputs and start the rank-agreement check -> build on first use -> [enter the
TP region] -> merge masks (global positions) -> project q/k/v (Keras-layout
kernels; only the tokens anyone attends to, when padding allows) -> [append to
the KV cache] -> fold to `*_BTNH` -> local kernel (flash-attn / varlen / SDPA /
math) with dropout under the layer's RNG stream, or ring/Ulysses context
parallelism -> unfold -> [gate] -> output projection -> [leave the TP region].
Both Keras layers are thin constructors over this one forward: multi-head
attention is the `K == N` case.
"""

from __future__ import annotations

import math
from contextlib import nullcontext as _nullcontext

import torch
from torch import nn

from dist_mha.attention.kernels import AttentionRequest, attention
from dist_mha.attention.kv_cache import KVCache
from dist_mha.attention.layout import AttentionLayout, normalize_attention_axes
from dist_mha.engine import call, projections
from dist_mha.engine import config as cfg
from dist_mha.engine import context as cp_attention
from dist_mha.engine.dropout import DropoutStreams
from dist_mha.engine.fused_projection import project
from dist_mha.keras_objects import constraints, initializers, regularizers
from dist_mha.parallel import region
from dist_mha.parallel.cp import layout as cp_layout
from dist_mha.parallel.tp import sharding

DROPOUT_MODES = ("per_rank", "tp_invariant")

# Constructor arguments both Keras layers take with the same meaning (their head arguments differ).
SHARED_ARGS = (
    "dropout", "use_bias", "sliding_window", "flash_attention", "kernel_initializer", "bias_initializer",
    "kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint", "bias_constraint",
    "use_gate", "seed", "query_shape", "value_shape", "key_shape", "attention_backend", "device", "dtype", "tp_group",
    "sequence_parallel", "cp_group", "cp_mode", "dropout_mode", "check_ranks", "name", "trainable", "kwargs",
)


def shared_args(args: dict) -> dict:
    """The `SHARED_ARGS` from a layer constructor's `locals()`."""
    return {k: args[k] for k in SHARED_ARGS}


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
        check_ranks, name, trainable, kwargs, cp_group=None, cp_mode="ring",
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
        sharding.check_heads_divisible(num_heads, self.tp_size, num_kv_heads)
        self.sequence_parallel = cfg.boolean("sequence_parallel", sequence_parallel)
        if dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"Received an invalid value for argument `dropout_mode`, expected one of {DROPOUT_MODES}. Received: dropout_mode={dropout_mode!r}")
        self.dropout_mode = dropout_mode
        self.cp_group = cfg.process_group("cp_group", cp_group)
        self.cp_size, self.cp_rank = cp_layout.cp_size_of(self.cp_group), cp_layout.cp_rank_of(self.cp_group)
        self.cp_mode = cp_mode
        cp_layout.check_cp_layer(self, self.cp_group, cp_mode)
        self.check_ranks = cfg.boolean("check_ranks", check_ranks)
        # The rank-agreement check runs on gloo companions of the TP and CP groups.
        self._check_groups = [sharding.cpu_group(g) for g, n in ((self.tp_group, self.tp_size),
                                                                 (self.cp_group, self.cp_size)) if n > 1]
        self.name = name or layer_name
        self._param_dtype = cfg.param_dtype(dtype)
        self._compute_dtype = cfg.compute_dtype(dtype)  # Keras mixed policies: inputs are cast to it
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
        base = sharding.agreed_random_base(self.tp_group, self._device)
        for proj in projections.build_projections(self, query_shape[-1], value_shape[-1], key_shape[-1], rank):
            self.add_module(proj.name, proj)
            projections.initialize(proj, self._kernel_initializer, self._bias_initializer, base, self.tp_group)
        self._make_streams(base)
        self._built_dims = (query_shape[-1], value_shape[-1], key_shape[-1], rank)
        self.built = True
        self.trainable = self._trainable

    def _check_build_rank(self, rank: int) -> None:
        """Layers that take only some input ranks override this."""

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
    ):
        c = call.validate(self, query, value, key, [query_mask, value_mask, key_mask, attention_mask, segment_ids],
                          return_attention_scores, training, use_causal_mask, cache)
        query, value, key, dropout_p, pending = c.query, c.value, c.key, c.dropout_p, c.pending
        return_attention_scores = c.return_scores
        group, sp = self.tp_group, self.sequence_parallel
        if self.tp_size > 1:
            if sp and pending is not None:  # the all-gather is this call's first collective
                pending.wait()
                pending = None
            query, value, key = region.enter(group, sp, query, value, key)

        layout = AttentionLayout(query.dim(), self._attention_axes)
        masks, t_dims, s_dims = call.masks(self, layout, query, value, key, query_mask, value_mask, key_mask,
                                           attention_mask, c.causal, segment_ids, cache)
        projs = self._projections()
        rows = call.valid_rows(self, masks, query, value, key, c, cache)  # padding no one attends to
        if rows is None:
            q, k, gate, v = project(projs, query, key, value, self._projection_weights(projs))  # (B, d.., n|k, H|Hv)
        else:
            x_R = query.reshape(-1, query.shape[-1]).index_select(0, rows)
            lead = query.shape[:-1]
            q, k, gate, v = (None if y is None else call.scatter_rows(y, rows, lead.numel()).view(*lead, *y.shape[1:])
                             for y in project(projs, x_R, x_R, x_R, self._projection_weights(projs)))
        if cache is not None:
            # Keys and values of every position so far; query i sits at position L + i.
            k, v, masks.k_keep_BS, masks.q_offset = cache.append(k, v, masks.k_keep_BS)
        h0, h1 = sharding.head_range(self._num_heads, group)
        if masks.dense_BNTS is not None and masks.dense_BNTS.shape[1] == self._num_heads != h1 - h0:
            masks.dense_BNTS = masks.dense_BNTS[:, h0:h1]  # a per-head mask: keep this rank's heads
        req = AttentionRequest(
            layout.to_BTNH(q), layout.to_BTNH(k), layout.to_BTNH(v), masks,
            self._inverse_sqrt_key_dim, dropout_p, return_attention_scores,
        )
        if self.cp_size > 1:
            if pending is not None:  # context parallelism communicates inside the kernel call
                pending.wait()
                pending = None
            # Ring blocks key their dropout masks by global position; Ulysses's local kernel
            # draws from this rank's stream (per_rank) or gets TP-invariant masks.
            per_rank = dropout_p > 0 and self.cp_mode == "ulysses" and self.dropout_mode == "per_rank"
            stream = self._dropout_stream if per_rank else None
            with stream.fork(query.device) if stream is not None else _nullcontext():
                out_BTNH, backend, why = cp_attention.attend(self, req, h0, h1, t_dims[0], s_dims[0])
            probs = None
        else:
            req.rng = self._dropout_for(req, h0, h1) if dropout_p > 0 else None  # kernels draw dropout from it
            out_BTNH, probs, backend, why = attention(req, self._flash_attention, self._attention_backend)
        # Plain attributes, set without nn.Module.__setattr__'s per-call bookkeeping.
        self.__dict__["last_backend"], self.__dict__["last_backend_reason"] = backend, why
        context = layout.from_BTNH(out_BTNH, q.shape)  # (B, d.., n, Hv)
        if gate is not None:
            context = context * gate
        out_proj = self._modules["attention_output"]
        if rows is not None:
            # Skipped tokens have a zero context: their output is the bias alone.
            context = context.reshape(-1, *context.shape[-2:]).index_select(0, rows)
        bias_now = rows is None  # with skipped rows the bias is added after scattering back
        if self.tp_size > 1:
            partial = out_proj(context, add_bias=False)
            if pending is not None:  # the output all-reduce is this call's first collective
                pending.wait()
            output = region.leave(group, sp, partial, out_proj.bias if bias_now else None)
        else:
            output = out_proj(context, add_bias=bias_now)
        if rows is not None:
            lead = query.shape[:-1]
            output = call.scatter_rows(output, rows, lead.numel()).view(*lead, *output.shape[1:])
            if out_proj.bias is not None:
                output = output + out_proj.bias.to(output.dtype)
        if not return_attention_scores:
            self._record_activity(q, k, gate, v, output)
            return output
        scores = layout.scores_from_BNTS(probs, q.shape, k.shape)
        heads_dim = len(layout.batch_dims)
        if not local_scores:
            scores = sharding.gather_full(scores, heads_dim, group)
        self._record_activity(q, k, gate, v, output, scores, heads_dim if local_scores else None)
        return output, scores

"""`MultiHeadAttention`: Keras 3's layer as a `torch.nn.Module`.

The Keras-facing constructor, properties and config; the forward pass is the
shared engine in `dist_mha.engine.attention` (multi-head attention is its case
of as many key/value heads as query heads).
"""

from __future__ import annotations

from dist_mha.engine import config as cfg
from dist_mha.engine.attention import AttentionCore
from dist_mha.layers.keras_api import KerasLayerAPI, shared_args


class MultiHeadAttention(KerasLayerAPI, AttentionCore):
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
            (replicated) inputs. A 1-D `DeviceMesh` (`state.mesh["tp"]`) makes the
            parameters DTensors on it (FSDP2, DCP; README "FSDP2 and DeviceMesh").
        sequence_parallel: keyword-only: inputs and output are sharded on dim 1
            across `tp_group` (Megatron-style); masks are still given in full.
        cp_group: keyword-only: a process group over which the sequence is
            split (context parallelism); inputs and output are this rank's
            part (`dist_mha.parallel.shard_sequence`), masks are global, causal
            and `sliding_window` use global positions. None: no CP. With
            `tp_group` too, TP x CP is a 2-D layout. Rank-3 inputs. A 1-D
            `DeviceMesh` (`state.mesh["cp"]`, with `tp_group` a mesh axis too).
        cp_mode: keyword-only: "ring" (K/V blocks passed around the group,
            log-sum-exp merge; any CP size) or "ulysses" (all-to-all to a head
            shard; this rank's heads must divide by the CP size).
        dropout_mode: keyword-only: "per_rank" (default; each TP rank's heads
            draw from their own stream, fast, any backend) or "tp_invariant"
            (masks keyed by seed, call, global head and position: identical
            results at every TP degree; math backend only).
        check_ranks: keyword-only: under TP, one tiny all-reduce per call
            verifies that all ranks pass the same shapes and flags, so a
            mismatch raises instead of hanging. Default True.
        rope: keyword-only: rotary positions, a dict with the keys of a
            Hugging Face `rope_parameters` dict (`rope_type`, `rope_theta`,
            `partial_rotary_factor`, each type's own keys) plus `interleaved`
            (GPT-J pairs); None: no rotation. Rank-3 inputs.
        qk_norm, qk_norm_eps: keyword-only: "rms" normalises every query and
            key head over key_dim (weights `query_norm`, `key_norm`) before the
            rotation.
        logit_softcap: keyword-only: scores become `c * tanh(s / c)` before the
            masks.
        attention_sinks: keyword-only: a learned logit per head (`sinks`) joins
            every row's softmax denominator.
        scale: keyword-only: the score scale instead of `1/sqrt(key_dim)`.
        output_bias: keyword-only: whether the output projection has a bias;
            None follows `use_bias`.
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
        position_ids: keyword-only, with `rope`: int `(B, T)` positions of the
            queries (and keys of self-attention), or a pair `(q_pos, k_pos)`;
            global under CP. Default `0..T-1`, restarting per document with
            `segment_ids`, continuing from a cache's length.

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
        cp_group=None,
        cp_mode="ring",
        dropout_mode="per_rank",
        check_ranks=True,
        rope=None,
        qk_norm=None,
        qk_norm_eps=1e-6,
        logit_softcap=None,
        attention_sinks=False,
        scale=None,
        output_bias=None,
        name=None,
        trainable=True,
        **kwargs,
    ):
        super().__init__()
        num_heads = cfg.positive_int("num_heads", num_heads)
        key_dim = cfg.positive_int("key_dim", key_dim)
        self._init_core(
            layer_name="multi_head_attention", num_heads=num_heads, num_kv_heads=num_heads, key_dim=key_dim,
            value_dim=cfg.positive_int("value_dim", value_dim, allow_none=True) or key_dim,
            output_shape=cfg.output_shape(output_shape), attention_axes=cfg.attention_axes(attention_axes),
            **shared_args(locals()),
        )

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

    # -- config ---------------------------------------------------------------------
    def get_config(self) -> dict:
        """The constructor arguments, with Keras's keys and serialisations."""
        return {
            **self._base_config(),
            "num_heads": self._num_heads,
            "key_dim": self._key_dim,
            "value_dim": self._value_dim,
            "dropout": self._dropout,
            "use_bias": self._use_bias,
            "use_gate": self._use_gate,
            "output_shape": self._output_shape,
            "attention_axes": self._attention_axes,
            "sliding_window": self._sliding_window,
            **self._objects_config(),
            "seed": self.seed,
            **self._extras_config(),
        }

"""`GroupQueryAttention`: Keras 3's grouped-query attention layer as a `torch.nn.Module`.

The Keras-facing constructor, properties and config; the forward pass is the
engine in `dist_mha.engine.attention`, the same one `MultiHeadAttention` runs.
"""

from __future__ import annotations

from dist_mha.engine import config as cfg
from dist_mha.engine.attention import AttentionCore
from dist_mha.layers.keras_api import KerasLayerAPI, shared_args


class GroupQueryAttention(KerasLayerAPI, AttentionCore):
    """Grouped-query attention with the API and numerics of Keras 3's `GroupQueryAttention`.

    `num_key_value_heads` key/value heads serve `num_query_heads` query heads:
    query head `i` reads key/value head `i // (num_query_heads /
    num_key_value_heads)` (Keras repeats K/V; dist_mha's SDPA and flash-attn
    paths read them in place). One key/value head is multi-query attention;
    as many as query heads is multi-head attention. Queries are scaled by
    `1/sqrt(head_dim)`; the output has the query's feature size.

    Under tensor parallelism the query heads split across the group; the
    key/value heads split too when `num_key_value_heads % tp == 0`, and when
    there are fewer of them than ranks (`tp % num_key_value_heads == 0`) each
    rank holds the one its query heads read, replicated on
    `tp / num_key_value_heads` ranks, whose gradients are summed.

    Args:
        head_dim: Size of each attention head (query, key and value).
        num_query_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads; divides `num_query_heads`.
        dropout: Dropout probability on the attention probabilities.
        use_bias: Whether the dense projections use biases.
        sliding_window: Optional positive int: each query attends only to keys
            within `sliding_window - 1` positions of itself.
        flash_attention: `None` picks the fastest backend; `True` requires
            flash-attn (ValueError listing each backend's reasons otherwise);
            `False` never uses it.
        kernel_initializer, bias_initializer, kernel_regularizer,
            bias_regularizer, activity_regularizer, kernel_constraint,
            bias_constraint: as in `MultiHeadAttention`.
        use_gate: Gated attention: `sigmoid(gate_dense(query))` multiplies the
            attention output before the output projection.
        seed: Seed for the dropout stream.
        query_shape, value_shape, key_shape, attention_backend, device, dtype,
            tp_group, sequence_parallel, cp_group, cp_mode, dropout_mode,
            check_ranks: keyword-only torch extras, as in `MultiHeadAttention`.

    Call arguments:
        query: `(B, T, Dq)`.
        value: `(B, S, Dv)`.
        key: optional `(B, S, Dk)`; defaults to `value`.
        query_mask, value_mask, key_mask, attention_mask,
            return_attention_scores, training, use_causal_mask: as in
            `MultiHeadAttention`.

    Returns:
        `attention_output` `(B, T, Dq)`, and with `return_attention_scores=True`
        also the scores `(B, num_query_heads, T, S)`.

    Raises:
        ValueError: on any invalid argument or input, naming it; when
            `num_query_heads % num_key_value_heads != 0`; when the TP group
            cannot split the heads (the valid TP sizes are listed).

    Example:

    >>> gqa = GroupQueryAttention(head_dim=16, num_query_heads=8, num_key_value_heads=2, query_shape=64)
    >>> x = torch.randn(2, 10, 64)
    >>> gqa(x, x, use_causal_mask=True).shape
    torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        head_dim,
        num_query_heads,
        num_key_value_heads,
        dropout=0.0,
        use_bias=True,
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
        head_dim = cfg.positive_int("head_dim", head_dim)
        num_query_heads = cfg.positive_int("num_query_heads", num_query_heads)
        num_key_value_heads = cfg.positive_int("num_key_value_heads", num_key_value_heads)
        if num_query_heads % num_key_value_heads:
            valid = [k for k in range(1, num_query_heads + 1) if num_query_heads % k == 0]
            raise ValueError(
                "`num_query_heads` must be divisible by `num_key_value_heads`. Received: "
                f"num_query_heads={num_query_heads}, num_key_value_heads={num_key_value_heads}; "
                f"valid num_key_value_heads for {num_query_heads} query heads: {valid}."
            )
        self._init_core(
            layer_name="grouped_query_attention", num_heads=num_query_heads, num_kv_heads=num_key_value_heads,
            key_dim=head_dim, value_dim=head_dim, output_shape=None, attention_axes=None, **shared_args(locals()),
        )

    # -- Keras attributes ------------------------------------------------------
    head_dim = property(lambda self: self._key_dim)
    num_query_heads = property(lambda self: self._num_heads)
    num_key_value_heads = property(lambda self: self._num_kv_heads)
    num_repeats = property(lambda self: self._num_heads // self._num_kv_heads)
    dropout = property(lambda self: self._dropout)
    use_bias = property(lambda self: self._use_bias)
    use_gate = property(lambda self: self._use_gate)
    sliding_window = property(lambda self: self._sliding_window)

    _regularizes_own_outputs = True  # Keras's GQA sets its own activity_regularizer (see keras_api)

    def _check_build_rank(self, rank: int) -> None:
        if rank != 3:
            raise ValueError(
                "GroupQueryAttention takes rank-3 inputs `(batch, seq, features)` (Keras's einsums are "
                f"`bqm,muh->bquh`). Received inputs of rank {rank}; use MultiHeadAttention with "
                "`attention_axes` for attention over several axes."
            )

    # -- config ---------------------------------------------------------------------
    def get_config(self) -> dict:
        """The constructor arguments, with Keras's keys and serialisations."""
        return {
            **self._base_config(),
            "head_dim": self._key_dim,
            "num_query_heads": self._num_heads,
            "num_key_value_heads": self._num_kv_heads,
            "use_bias": self._use_bias,
            "use_gate": self._use_gate,
            "sliding_window": self._sliding_window,
            "dropout": self._dropout,
            **self._objects_config(),
            "seed": self.seed,
            **self._extras_config(),
        }

    def compute_output_shape(self, query_shape, value_shape, key_shape=None):
        """Output shape (the query's); works unbuilt. Keras's checks and wording."""
        query_shape, value_shape = tuple(query_shape), tuple(value_shape)
        if query_shape[-1] != value_shape[-1]:  # Keras's first check, whatever `key_shape` is
            raise ValueError(
                "The last dimension of `query_shape` and `value_shape` must be equal, but are "
                f"{query_shape[-1]}, {value_shape[-1]}. Received: query_shape={query_shape}, value_shape={value_shape}"
            )
        return super().compute_output_shape(query_shape, value_shape, key_shape)

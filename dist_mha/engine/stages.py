"""The stages of one forward call, in order; `AttentionCore.forward` calls each once.

Shape legend: B batch, T/S query/key positions (after layout.py folds
multi-axis attention; global under context parallelism), N query heads, n
this TP rank's, H key_dim, Hv value_dim, E input features.

validate (call.py) -> enter_region -> masks -> project -> normalize_qk ->
rotate -> append_to_cache -> attend -> project_output -> results. Each stage reads and writes fields of
the `Call`; a new feature is a new stage (one line in the forward) or a
kernel capability, never a second copy of one of these.
"""

from __future__ import annotations

from dist_mha.attention import rotary
from dist_mha.attention.keras_masks import build_mask_spec
from dist_mha.attention.kernels import AttentionRequest, attention
from dist_mha.attention.layout import AttentionLayout
from dist_mha.attention.segments import parse_segment_ids
from dist_mha.engine import compaction, positions
from dist_mha.engine import context as cp_attention
from dist_mha.engine.call import Call
from dist_mha.engine.fused_projection import project as project_inputs
from dist_mha.parallel import region
from dist_mha.parallel.collectives import copy_to_tp
from dist_mha.parallel.tp import sharding


def enter_region(layer, c: Call) -> None:
    """Under TP: replicated inputs enter the region (`copy_to_tp`), or SP shards are all-gathered."""
    if layer.tp_size > 1:
        if layer.sequence_parallel:
            c.wait_agreement()  # the all-gather is this call's first collective
        c.query, c.value, c.key = region.enter(layer.tp_group, layer.sequence_parallel, c.query, c.value, c.key)


def masks(layer, c: Call) -> None:
    """Keras's masks, causal, window and segment ids as one `MaskSpec` in global positions (CP and cache included)."""
    query, value, key, cache = c.query, c.value, c.key, c.cache
    c.layout = layout = AttentionLayout(query.dim(), layer._attention_axes)
    grow = layer.cp_size
    batch = [query.shape[d] for d in layout.batch_dims]
    t_dims = [query.shape[d] * grow for d in layout.attention_axes]
    s_dims = [key.shape[d] * grow + (0 if cache is None else cache.length) for d in layout.attention_axes]
    q_shape, v_shape = list(query.shape), list(value.shape)
    q_shape[1], v_shape[1] = q_shape[1] * grow, v_shape[1] * grow
    a = c.mask_args
    c.masks = build_mask_spec(
        layout, q_shape, v_shape, (*batch, layer._num_heads, *t_dims, *s_dims),
        query_mask=a["query_mask"], value_mask=a["value_mask"], key_mask=a["key_mask"],
        attention_mask=a["attention_mask"], use_causal_mask=c.causal, sliding_window=layer._sliding_window,
        device=query.device,
    )
    if a["segment_ids"] is not None:
        if cache is not None:
            raise ValueError("`segment_ids` and `cache` cannot be combined: decode one document per cache row.")
        c.masks.q_seg_BT, c.masks.k_seg_BS = parse_segment_ids(a["segment_ids"], q_shape, v_shape, value is query,
                                                              query.device)
    c.T, c.S = t_dims[0], s_dims[0]


def project(layer, c: Call) -> None:
    """q/k/[gate]/v of this rank's heads; self-attention projects only the tokens anyone attends to."""
    projs = layer._projections()
    weights = layer._projection_weights(projs)
    c.rows = compaction.valid_rows(layer, c)
    if c.rows is None:
        c.q, c.k, c.gate, c.v = project_inputs(projs, c.query, c.key, c.value, weights)  # (B, d.., n|k, H|Hv)
        return
    x_R = c.query.reshape(-1, c.query.shape[-1]).index_select(0, c.rows)
    lead = c.query.shape[:-1]
    projected = project_inputs(projs, x_R, x_R, x_R, weights)
    c.q, c.k, c.gate, c.v = (None if y is None else compaction.scatter_rows(y, c.rows, lead) for y in projected)


def normalize_qk(layer, c: Call) -> None:
    """QK-norm: RMSNorm of every query and key head over key_dim (Qwen3), before the rotation.

    With rotary positions the norm runs inside the rotation's op (`rotate` takes the weights).
    """
    if layer._qk_norm is None:
        return
    w_q, w_k = layer._modules["query_norm"].weight, layer._modules["key_norm"].weight
    if layer.tp_size > 1:
        # Replicated weights used on this rank's heads only: their gradients are partial, summed over TP.
        w_q, w_k = copy_to_tp(layer.tp_group, w_q, w_k)
    if layer._rope is not None:
        c.qk_norm = (w_q, w_k)
        return
    c.q = rotary.rms_norm(c.q, w_q, layer._qk_norm_eps)
    c.k = rotary.rms_norm(c.k, w_k, layer._qk_norm_eps)


def rotate(layer, c: Call) -> None:
    """Rotary positions: queries and keys turned by their positions (global under CP), before the cache."""
    rope = layer._rope
    if rope is None:
        return
    norms, eps = c.qk_norm or (None, None), layer._qk_norm_eps
    if positions.one_range(layer, c):  # the default positions: start..start+T-1 (S), tables cached
        start = 0 if c.cache is None else c.cache.length
        T, S = c.T, c.S - start
        if c.qk_norm is None and S == T and rotary.flash_rotary() is not None and rotary.kernel_takes(c.q):
            # flash-attn's kernel: a table and an offset
            c.q, c.k = (rotary.rotate_range(rope, start, x, start + T) for x in (c.q, c.k))
            return

        def tables(dtype, n):
            cos, sin = rotary.range_angles(rope, start + max(T, S), dtype, c.q.device)
            return cos[:, start:start + n], sin[:, start:start + n]

        same = S == T and c.k.dtype == c.q.dtype
        q_tables = tables(c.q.dtype, T)
        k_tables = q_tables if same else tables(c.k.dtype, S)
    else:
        q_pos, k_pos, longest = positions.call_positions(layer, c, c.mask_args["position_ids"])
        same = k_pos is q_pos and c.k.dtype == c.q.dtype
        q_tables = rotary.angles(rope, q_pos, c.q.dtype, longest)
        k_tables = q_tables if same else rotary.angles(rope, k_pos, c.k.dtype, longest)
    if same:
        c.q, c.k = rotary.rotate(rope, *q_tables, c.q, c.k, norm_weights=norms, eps=eps)
        return
    c.q = rotary.rotate(rope, *q_tables, c.q, norm_weights=norms[:1], eps=eps)
    c.k = rotary.rotate(rope, *k_tables, c.k, norm_weights=norms[1:], eps=eps)


def append_to_cache(layer, c: Call) -> None:
    """With a KV cache: this call's keys and values join it; queries attend to every cached position."""
    if c.cache is not None:
        m = c.masks
        c.k, c.v, m.k_keep_BS, m.q_offset = c.cache.append(c.k, c.v, m.k_keep_BS)


def attend(layer, c: Call) -> None:
    """The local kernel (flash-attn / varlen / SDPA / math), or ring / Ulysses context parallelism."""
    h0, h1 = c.heads = sharding.head_range(layer._num_heads, layer.tp_group)
    m = c.masks
    if m.dense_BNTS is not None and m.dense_BNTS.shape[1] == layer._num_heads != h1 - h0:
        m.dense_BNTS = m.dense_BNTS[:, h0:h1]  # a per-head mask: keep this rank's heads
    lay = c.layout
    req = AttentionRequest(lay.to_BTNH(c.q), lay.to_BTNH(c.k), lay.to_BTNH(c.v), m, layer._scale, c.dropout_p,
                           c.return_scores, softcap=layer._logit_softcap, sinks=getattr(layer, "sinks", None))
    if layer.cp_size > 1:
        c.wait_agreement()  # context parallelism communicates inside the kernel call
        c.out_BTNH, backend, why = cp_attention.attend(layer, req, h0, h1, c.T, c.S)
    else:
        req.rng = layer._dropout_for(req, h0, h1) if c.dropout_p > 0 else None  # kernels draw dropout from it
        c.out_BTNH, c.probs, backend, why = attention(req, layer._flash_attention, layer._attention_backend)
    # Plain attributes, set without nn.Module.__setattr__'s per-call bookkeeping.
    layer.__dict__["last_backend"], layer.__dict__["last_backend_reason"] = backend, why


def project_output(layer, c: Call) -> None:
    """[gate] -> output projection -> [leave the TP region: all-reduce, or reduce-scatter under SP]."""
    context = c.layout.from_BTNH(c.out_BTNH, c.q.shape)  # (B, d.., n, Hv)
    if c.gate is not None:
        context = context * c.gate
    out_proj = layer._modules["attention_output"]
    if c.rows is not None:
        # Skipped tokens have a zero context: their output is the bias alone.
        context = context.reshape(-1, *context.shape[-2:]).index_select(0, c.rows)
    bias_now = c.rows is None  # with skipped rows the bias is added after scattering back
    if layer.tp_size > 1:
        partial = out_proj(context, add_bias=False)
        c.wait_agreement()  # the output all-reduce is this call's first collective
        output = region.leave(layer.tp_group, layer.sequence_parallel, partial, out_proj.bias if bias_now else None)
    else:
        output = out_proj(context, add_bias=bias_now)
    if c.rows is not None:
        output = compaction.scatter_rows(output, c.rows, c.query.shape[:-1])
        if out_proj.bias is not None:
            output = output + out_proj.bias.to(output.dtype)
    c.output = output


def results(layer, c: Call):
    """The output (and scores, gathered over TP unless `local_scores`); records Keras's activity penalties."""
    if not c.return_scores:
        layer._record_activity(c.q, c.k, c.gate, c.v, c.output)
        return c.output
    scores = c.layout.scores_from_BNTS(c.probs, c.q.shape, c.k.shape)
    heads_dim = len(c.layout.batch_dims)
    if not c.local_scores:
        scores = sharding.gather_full(scores, heads_dim, layer.tp_group)
    layer._record_activity(c.q, c.k, c.gate, c.v, c.output, scores, heads_dim if c.local_scores else None)
    return c.output, scores

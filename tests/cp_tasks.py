"""Context-parallel task bodies run inside the rank pool (see tp_tasks.py)."""

from __future__ import annotations

import torch

from dist_mha import GroupQueryAttention
from dist_mha.testing import compare_with_reference

B, T, S, E = 2, 16, 8, 12


def _keep(*shape, seed=0, p=0.7):
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p
    m[..., 0] = True
    return m


def cp_cases():
    """(name, layer kwargs, query shape, value shape, key shape, call kwargs, GQA)."""
    base = dict(num_heads=4, key_dim=3)
    return [
        ("self", base, (B, T, E), None, None, {}, False),
        ("causal", base, (B, T, E), None, None, dict(use_causal_mask=True), False),
        ("cross", {**base, "value_dim": 5}, (B, T, E), (B, S, 7), (B, S, 6), {}, False),
        ("cross_causal_padded", base, (B, T, E), (B, S, E), None,
         dict(use_causal_mask=True, value_mask=_keep(B, S)), False),
        ("key_padding_causal", base, (B, T, E), None, None, dict(use_causal_mask=True, value_mask=_keep(B, T, seed=1)), False),
        ("attention_mask", base, (B, T, E), None, None, dict(attention_mask=_keep(B, T, T, seed=2)), False),
        ("per_head_mask", base, (B, T, E), None, None, dict(attention_mask=_keep(B, 4, T, T, seed=3)), False),
        # (B, 1, S): one row of keys for every query, broadcast as the README allows.
        ("broadcast_mask", base, (B, T, E), None, None, dict(attention_mask=_keep(B, 1, T, seed=6)), False),
        ("query_mask_window", {**base, "sliding_window": 3}, (B, T, E), None, None,
         dict(query_mask=_keep(B, T, seed=4)), False),
        ("window_causal_gate", {**base, "sliding_window": 5, "use_gate": True}, (B, T, E), None, None,
         dict(use_causal_mask=True), False),
        ("empty_rows", base, (B, T, E), None, None,
         dict(attention_mask=torch.arange(T)[None, :, None].expand(B, T, T) % 5 != 0), False),
        ("gqa_causal", dict(head_dim=3, num_query_heads=4, num_key_value_heads=2), (B, T, E), None, None,
         dict(use_causal_mask=True), True),
        ("mqa_padded", dict(head_dim=3, num_query_heads=4, num_key_value_heads=1), (B, T, E), None, None,
         dict(value_mask=_keep(B, T, seed=5)), True),
        ("dropout_invariant", {**base, "dropout": 0.3, "seed": 5, "dropout_mode": "tp_invariant"}, (B, T, E), None,
         None, dict(use_causal_mask=True, training=True), False),
        ("segments_window", {**base, "sliding_window": 4}, (B, T, E), None, None,
         dict(use_causal_mask=True, segment_ids=torch.tensor([[0] * 5 + [1] * 6 + [2] * 3 + [-1] * 2,
                                                             [7] * 9 + [8] * 7])), False),
    ]


def _more_heads(kwargs):
    """The same case with 8 query heads (Ulysses at TP2 x CP4 needs 4 per TP rank)."""
    out = dict(kwargs)
    if "num_heads" in out:
        out["num_heads"] = 8
    if "num_query_heads" in out:
        out["num_query_heads"] = 8
    return out


def cp_parity(ctx, tp, cp, mode, dtype_name, backend=None, names=None, heads8=False):
    tp_group, cp_group = ctx.grid(tp, cp)
    dtype = getattr(torch, dtype_name)
    report = {}
    for name, kwargs, qs, vs, ks, call, gqa in cp_cases():
        if names is not None and name not in names:
            continue
        if heads8:
            kwargs = _more_heads(kwargs)
            if "attention_mask" in call and call["attention_mask"].dim() == 4:
                call = dict(call, attention_mask=_keep(B, 8, T, T, seed=3))
        kwargs = dict(kwargs, attention_backend=backend) if backend else kwargs
        try:
            r = compare_with_reference(tp_group, kwargs, qs, vs, ks, call, dtype=dtype, device=ctx.device,
                                       layer_cls=GroupQueryAttention if gqa else None, cp_group=cp_group,
                                       cp_mode=mode)
        except Exception as err:
            raise AssertionError(f"case {name!r} at TP={tp} x CP={cp} {mode} {dtype_name} backend={backend}: {err}") from err
        report[name] = (r["max_abs_error"], r["backend"])
    return report


def _layer(ctx, tp, cp, mode, **kw):
    from dist_mha import MultiHeadAttention

    tp_group, cp_group = ctx.grid(tp, cp)
    torch.manual_seed(0)
    return MultiHeadAttention(4, 3, query_shape=E, tp_group=tp_group, cp_group=cp_group, cp_mode=mode, **kw)


def ring_work(ctx, cp, causal, window=None):
    """Blocks this rank computes and skips in one forward (equal work per rank under the balanced layout)."""
    layer = _layer(ctx, 1, cp, "ring", sliding_window=window, check_ranks=False)
    x = torch.randn(B, 4 * cp * 2, E)
    layer(x, x, use_causal_mask=causal)
    return layer.last_ring_blocks


def cp_comm(ctx, tp, cp, mode, cross):
    """Counts (op, numel) of collectives and point-to-point transfers in one call, forward and backward."""
    import torch.distributed as dist

    from tp_tasks import count_collectives

    layer = _layer(ctx, tp, cp, mode, check_ranks=False)
    q = torch.randn(B, 2 * 2, E, requires_grad=True)
    v = torch.randn(B, 2 * 3, E, requires_grad=True) if cross else q
    p2p = []
    real = dist.batch_isend_irecv

    def spy(ops):
        p2p.append([(op.op.__name__, op.tensor.numel()) for op in ops])
        return real(ops)

    dist.batch_isend_irecv = spy
    try:
        with count_collectives() as fwd:
            out = layer(q, v, use_causal_mask=True)
        fwd_p2p, p2p[:] = list(p2p), []
        with count_collectives() as bwd:
            out.square().sum().backward()
        bwd_p2p = list(p2p)
    finally:
        dist.batch_isend_irecv = real
    return {"forward": fwd, "backward": bwd, "forward_p2p": fwd_p2p, "backward_p2p": bwd_p2p}


def dropout_per_rank(ctx, cp, mode):
    """Per-rank dropout under CP: reproducible from the same seed, different across calls."""
    outs = []
    for _ in range(2):
        layer = _layer(ctx, 1, cp, mode, dropout=0.5, seed=3, dtype=torch.float64)
        x = torch.randn(B, 8, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        outs.append([layer(x, x, training=True) for _ in range(2)])
    (a1, a2), (b1, b2) = outs
    return bool(torch.equal(a1, b1) and torch.equal(a2, b2)), bool(not torch.equal(a1, a2))


def cp_errors(ctx, what):
    """Returns the error message (or None) of a bad CP configuration or call, on every rank."""
    from dist_mha import MultiHeadAttention

    tp_group, cp_group = ctx.grid(1, 4)
    try:
        if what == "ulysses_heads":
            MultiHeadAttention(6, 3, query_shape=E, cp_group=cp_group, cp_mode="ulysses")
        elif what == "mode":
            MultiHeadAttention(4, 3, query_shape=E, cp_group=cp_group, cp_mode="zigzag")
        else:
            layer = MultiHeadAttention(4, 3, query_shape=E, cp_group=cp_group, **(
                {"attention_backend": "flash"} if what == "forced_flash" else {}))
            x = torch.randn(B, 3 if what == "odd_length" else 4, E)
            if what == "scores":
                layer(x, x, return_attention_scores=True)
            else:
                layer(x, x)
    except ValueError as err:
        return str(err)
    return None


def cp_counted_bytes(ctx, tp, cp, mode, kv_heads):
    """Payload bytes of every collective and send in one float32 call (T=16, S=12 global; cross-attention)."""
    import torch.distributed as dist

    from dist_mha import GroupQueryAttention
    from dist_mha.parallel import shard_sequence
    from tp_tasks import count_collectives

    tp_group, cp_group = ctx.grid(tp, cp)
    torch.manual_seed(0)
    layer = GroupQueryAttention(3, 4, kv_heads, query_shape=E, tp_group=tp_group, cp_group=cp_group, cp_mode=mode,
                                check_ranks=False)
    q = shard_sequence(torch.randn(B, 16, E), cp_group).requires_grad_()
    v = shard_sequence(torch.randn(B, 24, E), cp_group).requires_grad_()
    sent = {"forward": [], "backward": []}
    real = dist.batch_isend_irecv
    phase = ["forward"]

    def spy(ops):
        sent[phase[0]].extend(("p2p", op.tensor.numel() * op.tensor.element_size()) for op in ops if op.op is dist.isend)
        return real(ops)

    names = {"all_to_all_single": "all_to_all", "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
             "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter"}
    dist.batch_isend_irecv = spy
    try:
        with count_collectives() as fwd:
            out = layer(q, v)
        phase[0] = "backward"
        with count_collectives() as bwd:
            out.sum().backward()
    finally:
        dist.batch_isend_irecv = real
    for name, calls in (("forward", fwd), ("backward", bwd)):
        sent[name] += [(names.get(n, n), k * 4) for n, k in calls if n != "all_reduce"]  # TP's all-reduces: tp_payloads
    return sent


def decoder_under_cp(ctx, tp, cp, mode, nkv):
    """DecoderLM at TP x CP: this rank's logits and loss gradient vs the one-device model's (float64)."""
    from dist_mha.models.decoder import DecoderLM
    from dist_mha.parallel import shard_sequence

    tp_group, cp_group = ctx.grid(tp, cp)
    tokens = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    outs = []
    for groups in ((None, None), (tp_group, cp_group)):
        torch.manual_seed(0)
        model = DecoderLM(40, 32, 32, 4, 2, num_kv_heads=nkv, tp_group=groups[0], cp_group=groups[1], cp_mode=mode,
                          dtype=torch.float64)
        toks = tokens if groups[1] is None else shard_sequence(tokens, cp_group)
        logits = model(toks)
        logits.square().sum().backward()
        grad = model.tok.weight.grad.clone()
        if groups[1] is not None:
            torch.distributed.all_reduce(grad, group=cp_group)
        outs.append((logits.detach(), grad))
    (ref, ref_grad), (got, grad) = outs
    return float((got - shard_sequence(ref, cp_group)).abs().max()), float((grad - ref_grad).abs().max())


def state_layout(ctx, tp, cp):
    import torch.distributed as dist

    from dist_mha.parallel import build_parallel_state

    s = build_parallel_state(tp, cp)
    ranks = dist.get_process_group_ranks
    return dict(rank=dist.get_rank(), tp=ranks(s.tp_group), cp=ranks(s.cp_group), dp_cp=ranks(s.dp_cp_group),
                sizes=(s.tp_size, s.cp_size, s.dp_size))


def forced_varlen_under_ring(ctx):
    from dist_mha import MultiHeadAttention

    _, cp_group = ctx.grid(1, 2)
    layer = MultiHeadAttention(4, 3, query_shape=E, cp_group=cp_group, attention_backend="varlen")
    x = torch.randn(B, 4, E)
    try:
        layer(x, x, value_mask=torch.ones(B, 8, dtype=torch.bool))
    except ValueError as err:
        return str(err)
    return None

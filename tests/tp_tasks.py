"""Task bodies run inside the rank pool (module-level so workers can import them).

Each takes the worker's `RankContext` first; they raise on failure (the pool
re-raises in the parent with the rank) and return small, picklable results.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

from dist_mha import MultiHeadAttention
from dist_mha.checkpoint import load_tp_shard, save_tp_shard
from dist_mha.testing import compare_with_reference

B, T, S, E = 2, 8, 4, 12


def _keep(*shape, seed=0):
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.7
    m[..., 0] = True
    return m


def parity_cases():
    """(name, layer kwargs, query shape, value shape, key shape, call kwargs, sequence parallel)."""
    base = dict(num_heads=4, key_dim=3)
    cases = [
        ("self", base, (B, T, E), None, None, {}, False),
        ("cross", {**base, "value_dim": 5}, (B, T, E), (B, S, 7), (B, S, 6), {}, False),
        ("query_mask", base, (B, T, E), None, None, dict(query_mask=_keep(B, T)), False),
        ("value_key_masks", base, (B, T, E), (B, S, E), None, dict(value_mask=_keep(B, S), key_mask=_keep(B, S, seed=1)), False),
        ("attention_mask", base, (B, T, E), (B, S, E), None, dict(attention_mask=_keep(B, T, S)), False),
        ("per_head_mask", base, (B, T, E), (B, S, E), None, dict(attention_mask=_keep(B, 4, T, S)), False),
        ("causal", base, (B, T, E), None, None, dict(use_causal_mask=True), False),
        ("causal_T_ne_S", base, (B, T, E), (B, S, E), None, dict(use_causal_mask=True, value_mask=_keep(B, S)), False),
        ("axes_4d", {**base, "attention_axes": (2,)}, (B, 3, T, E), (B, 3, S, E), None, {}, False),
        ("output_shape_tuple", {**base, "output_shape": (2, 5)}, (B, T, E), None, None, {}, False),
        ("no_bias_gate", {**base, "use_bias": False, "use_gate": True}, (B, T, E), (B, S, E), None, {}, False),
        ("regularized", {**base, "kernel_regularizer": "l2", "activity_regularizer": "l1"}, (B, T, E), None, None, {}, False),
        ("sp_self", base, (B, T, E), None, None, dict(use_causal_mask=True), True),
        ("sp_cross", base, (B, T, E), (B, S, E), None, dict(value_mask=_keep(B, S)), True),
        ("sp_output_tuple", {**base, "output_shape": (2, 5)}, (B, T, E), None, None, {}, True),
        ("dropout_invariant", {**base, "dropout": 0.3, "seed": 5, "dropout_mode": "tp_invariant"}, (B, T, E), (B, S, E), None, {}, False),
        ("dropout_invariant_sp", {**base, "dropout": 0.3, "seed": 5, "dropout_mode": "tp_invariant"}, (B, T, E), None, None, dict(use_causal_mask=True), True),
    ]
    return cases


def parity_matrix(ctx, tp, dtype_name):
    dtype = getattr(torch, dtype_name)
    report = {}
    for name, kwargs, qs, vs, ks, call, sp in parity_cases():
        try:
            report[name] = compare_with_reference(ctx.group(tp), kwargs, qs, vs, ks, call, dtype=dtype,
                                                  device=ctx.device, sequence_parallel=sp)["max_abs_error"]
        except Exception as err:
            raise AssertionError(f"case {name!r} at TP={tp} {dtype_name}: {err}") from err
    return report


@contextlib.contextmanager
def count_collectives():
    """Counts (op, numel) of every torch.distributed collective; the real ones still run."""
    names = ["all_reduce", "broadcast", "all_to_all_single"]
    names += ["all_gather_single", "reduce_scatter_single"] if hasattr(dist, "all_gather_single") else [
        "all_gather_into_tensor", "reduce_scatter_tensor"]
    calls = []
    real = {n: getattr(dist, n) for n in names}

    def spy(n):
        def f(*args, **kwargs):
            tensor = args[1] if n.endswith(("single", "tensor")) else args[0]
            calls.append((n, tensor.numel()))
            return real[n](*args, **kwargs)
        return f

    for n in names:
        setattr(dist, n, spy(n))
    try:
        yield calls
    finally:
        for n in names:
            setattr(dist, n, real[n])


def comm_counts(ctx, tp, sequence_parallel, check_ranks, cross):
    group = ctx.group(tp)
    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 3, query_shape=E, tp_group=group, sequence_parallel=sequence_parallel,
                               check_ranks=check_ranks, device=ctx.device)
    t = T // tp if sequence_parallel else T
    q = torch.randn(B, t, E, device=ctx.device, requires_grad=True)
    v = torch.randn(B, t, E, device=ctx.device, requires_grad=True) if cross else q
    with count_collectives() as fwd:
        out = layer(q, v)
    with count_collectives() as bwd:
        out.sum().backward()
    summarize = lambda calls: dict(Counter(n for n, _ in calls))  # noqa: E731
    return {"forward": summarize(fwd), "backward": summarize(bwd), "forward_sizes": fwd}


def bad_head_count(ctx, tp):
    try:
        MultiHeadAttention(6, 3, query_shape=E, tp_group=ctx.group(tp))
    except ValueError as err:
        return str(err)
    return None


def disagreeing_shapes(ctx, tp):
    group = ctx.group(tp)
    layer = MultiHeadAttention(4, 3, query_shape=E, tp_group=group)
    rank = dist.get_rank(group)
    q = torch.randn(B, T + rank, E)  # rank-dependent length: a user bug
    try:
        layer(q, q)
    except ValueError as err:
        return str(err)
    return None


def init_invariance(ctx, tp, kernel_initializer, bias_initializer):
    kwargs = dict(num_heads=4, key_dim=3, value_dim=2, output_shape=(2, 3), use_gate=True,
                  kernel_initializer=kernel_initializer, bias_initializer=bias_initializer)
    torch.manual_seed(11)
    sharded = MultiHeadAttention(**kwargs, query_shape=E, value_shape=7, tp_group=ctx.group(tp), device=ctx.device).get_weights()
    torch.manual_seed(11)
    single = MultiHeadAttention(**kwargs, query_shape=E, value_shape=7, device=ctx.device).get_weights()
    return all(np.array_equal(a, b) for a, b in zip(sharded, single)) and len(sharded) == len(single)


def sgd_step(ctx, tp):
    kwargs = dict(num_heads=4, key_dim=3, kernel_regularizer="l2", bias_regularizer="l1",
                  kernel_constraint="max_norm", activity_regularizer="l2")
    results = []
    for group in (None, ctx.group(tp)):
        torch.manual_seed(3)
        layer = MultiHeadAttention(**kwargs, query_shape=E, value_shape=7, tp_group=group, dtype=torch.float64,
                                   device=ctx.device)
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        layer.constraint_hook(opt)
        gen = torch.Generator().manual_seed(4)
        q = torch.randn(B, T, E, generator=gen, dtype=torch.float64).to(ctx.device)
        v = torch.randn(B, S, 7, generator=gen, dtype=torch.float64).to(ctx.device)
        loss = layer(q, v, use_causal_mask=True).pow(2).mean() + sum(layer.losses)
        loss.backward()
        opt.step()
        results.append(layer.get_weights())
    return max(float(np.abs(a - b).max()) for a, b in zip(*results))


def constraints_and_losses(ctx, tp, constraint):
    out = []
    for group in (None, ctx.group(tp)):
        torch.manual_seed(5)
        layer = MultiHeadAttention(4, 3, query_shape=E, tp_group=group, kernel_constraint=constraint,
                                   bias_constraint=constraint, bias_initializer="random_normal",
                                   kernel_regularizer="l1_l2", bias_regularizer=lambda w: (w ** 4).sum(),
                                   dtype=torch.float64)
        x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        layer(x, x)
        losses = [float(v) for v in layer.losses]
        layer.apply_constraints()
        out.append((layer.get_weights(), losses))
    (w1, l1), (w2, l2) = out
    return max(float(np.abs(a - b).max()) for a, b in zip(w1, w2)), float(np.abs(np.array(l1) - np.array(l2)).max())


def per_rank_dropout(ctx, tp):
    """Head contexts under per-rank dropout: identical heads, so differences come from masks only."""
    group = ctx.group(tp)

    def run(training):
        torch.manual_seed(0)
        layer = MultiHeadAttention(4, 3, dropout=0.5, seed=9, query_shape=E, tp_group=group, attention_backend="math",
                                   device=ctx.device)
        # Every global head gets head 0's q/k/v weights (Keras order: kernel (D, N, H), bias (N, H)).
        weights = layer.get_weights()
        for i in range(6):
            w = weights[i]
            weights[i] = np.repeat(w[:, :1], w.shape[1], axis=1) if w.ndim == 3 else np.repeat(w[:1], w.shape[0], axis=0)
        layer.set_weights(weights)
        seen = []
        layer.output_dense.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(2)).to(ctx.device)
        layer(x, x, training=training)
        layer(x, x, training=training)
        with layer.replicated_stream.fork(ctx.device):
            replicated = torch.rand(4, device=ctx.device)
        return seen, replicated

    (first, rep), (again, _) = run(True), run(True)
    (plain, _) = run(False)
    reproducible = all(torch.equal(a, b) for a, b in zip(first, again))
    calls_differ = not torch.equal(first[0], first[1])
    head0 = first[0][:, :, 0]
    gathered = [torch.empty_like(head0) for _ in range(tp)]
    dist.all_gather(gathered, head0.contiguous(), group=group)
    plain_heads = [plain[0][:, :, 0]] * 1
    reps = [torch.empty_like(rep) for _ in range(tp)]
    dist.all_gather(reps, rep, group=group)
    # Identical heads differ by GEMM rounding (~1e-7) alone; dropout masks change them by O(1).
    ranks_differ = all((gathered[0] - g).abs().max() > 1e-2 for g in gathered[1:])
    return dict(reproducible=reproducible, calls_differ=calls_differ, ranks_differ=ranks_differ,
                eval_heads_equal=torch.allclose(plain[0][:, :, 0], plain[0][:, :, -1], atol=1e-6) and bool(plain_heads),
                replicated_equal=all(torch.equal(reps[0], r) for r in reps))


def reshard_checkpoint(ctx, a, b, directory):
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, E, generator=gen, dtype=torch.float64).to(ctx.device)
    kwargs = dict(num_heads=4, key_dim=3, dropout=0.2, seed=4, output_shape=(2, 3), dtype=torch.float64, device=ctx.device)
    src = MultiHeadAttention(**kwargs, query_shape=E, tp_group=ctx.group(a))
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    src(x, x).sum().backward()  # train one step so the weights are not the initial ones
    opt.step()
    src.eval()
    expected = src(x, x).detach()
    if ctx.rank < a:  # the first TP group writes the checkpoint
        save_tp_shard(src.state_dict(), directory, dist.get_rank(ctx.group(a)), a)
    dist.barrier()
    dst = MultiHeadAttention(**{**kwargs, "seed": 99}, query_shape=E, tp_group=ctx.group(b))
    dst.load_state_dict(load_tp_shard(directory, b, dist.get_rank(ctx.group(b)), map_location=ctx.device))
    dst.eval()
    got = dst(x, x).detach()
    dist.barrier()
    return float((got - expected).abs().max()), dst.seed


def halve_if_large(w):
    """A callable constraint whose result depends on the whole tensor."""
    return w / 2 if w.abs().max() > 0.1 else w


def collective_twins(ctx, tp):
    """Each region function's forward and backward against explicit formulas on gathered data."""
    from dist_mha.parallel import collectives as c

    group = ctx.group(tp)
    r = dist.get_rank(group)

    def gather_all(t):
        out = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(out, t.contiguous(), group=group)
        return out

    cases = {
        "copy_to_tp": (lambda x: c.copy_to_tp(group, x), lambda X: X[r], lambda W: sum(W)),
        "reduce_from_tp": (lambda x: c.reduce_from_tp(group, x), lambda X: sum(X), lambda W: W[r]),
        "gather_from_tp": (lambda x: c.gather_from_tp(group, x, 1), lambda X: torch.cat(X, 1),
                           lambda W: W[r].chunk(tp, 1)[r]),
        "scatter_to_tp": (lambda x: c.scatter_to_tp(group, x, 1), lambda X: X[r].chunk(tp, 1)[r],
                          lambda W: torch.cat(W, 1)),
        "gather_from_sp": (lambda x: c.gather_from_sp(group, x, 1), lambda X: torch.cat(X, 1),
                           lambda W: sum(W).chunk(tp, 1)[r]),
        "reduce_scatter_to_sp": (lambda x: c.reduce_scatter_to_sp(group, x, 1), lambda X: sum(X).chunk(tp, 1)[r],
                                 lambda W: torch.cat(W, 1)),
        "all_to_all_tp": (lambda x: c.all_to_all_tp(group, x, 1, 2),
                          lambda X: torch.cat([Xs.chunk(tp, 1)[r] for Xs in X], 2),
                          lambda W: torch.cat([Ws.chunk(tp, 2)[r] for Ws in W], 1)),
    }
    checked = []
    for name, (fn, expect_y, expect_grad) in cases.items():
        gen = torch.Generator().manual_seed(100 * r + len(checked))
        x = torch.randn(2, 4 * tp, 3 * tp, generator=gen, dtype=torch.float64).to(ctx.device).requires_grad_()
        y = fn(x)
        w = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(ctx.device)
        (y * w).sum().backward()
        X, W = gather_all(x.detach()), gather_all(w)
        torch.testing.assert_close(y.detach(), expect_y(X), rtol=0, atol=1e-12, msg=f"{name} forward")
        torch.testing.assert_close(x.grad, expect_grad(W), rtol=0, atol=1e-12, msg=f"{name} backward")
        checked.append(name)
    return checked


def parallel_state_layout(ctx, tp):
    from dist_mha.parallel import MPU, build_parallel_state

    state = build_parallel_state(tp)
    mpu = MPU(state)
    world = dist.get_world_size()
    return dict(
        tp_ranks=dist.get_process_group_ranks(state.tp_group),
        dp_ranks=dist.get_process_group_ranks(state.dp_group),
        mpu=(mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size(),
             mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(),
             mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()),
        group_is_tp=mpu.get_model_parallel_group() is state.tp_group and mpu.get_data_parallel_group() is state.dp_group,
        rank=dist.get_rank(), world=world,
    )


def bad_parallel_state(ctx, tp):
    from dist_mha.parallel import build_parallel_state

    try:
        build_parallel_state(tp)
    except ValueError as err:
        return str(err)
    return None


def counted_bytes(ctx, tp, sequence_parallel, cross):
    """Payload bytes of each collective in one call, counted on a real run."""
    group = ctx.group(tp)
    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 3, value_dim=5, output_shape=(2, 7), query_shape=E, value_shape=10,
                               tp_group=group, sequence_parallel=sequence_parallel, check_ranks=False)
    t, s = (T // tp, S // tp) if sequence_parallel else (T, S)
    q = torch.randn(B, t, E, requires_grad=True)
    v = torch.randn(B, s, 10, requires_grad=True)
    with count_collectives() as fwd:
        out = layer(q, v) if cross else None
    with count_collectives() as bwd:
        out.sum().backward()
    return {"forward": [(n, k * 4) for n, k in fwd], "backward": [(n, k * 4) for n, k in bwd]}


def compile_graph_breaks(ctx, tp, check_ranks, sequence_parallel):
    """`torch._dynamo.explain` of one TP call: (graphs, breaks, reasons), and whether compiled == eager."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    dynamo.reset()
    layer = MultiHeadAttention(4, 8, query_shape=32, tp_group=ctx.group(tp), check_ranks=check_ranks,
                               sequence_parallel=sequence_parallel, dtype=torch.float64)
    x = torch.randn(2, 8 // tp if sequence_parallel else 8, 32, dtype=torch.float64)
    e = dynamo.explain(layer)(x, x, use_causal_mask=True)
    compiled = torch.compile(layer, backend="eager")(x, x, use_causal_mask=True)
    same = bool(torch.equal(compiled, layer(x, x, use_causal_mask=True)))
    return e.graph_count, e.graph_break_count, sorted({str(b.reason).splitlines()[0] for b in e.break_reasons}), same


def disagreeing_call(ctx, tp, what):
    """One rank passes something different; returns every rank's error message (None if none raised)."""
    group = ctx.group(tp)
    layer = MultiHeadAttention(4, 3, query_shape=E, tp_group=group)
    rank = dist.get_rank(group)
    q = torch.randn(B, T, E)
    kwargs = {}
    if what == "mask_transposed":  # same element count, other shape
        kwargs["query_mask"] = torch.ones(B, T, dtype=torch.bool) if rank == 0 else torch.ones(T, B, dtype=torch.bool)
    elif what == "feature_dim":
        q = torch.randn(B, T, E + (rank == 1))
    elif what == "dtype":
        q = q.double() if rank == 1 else q
    try:
        layer(q, q, **kwargs)
    except ValueError as err:
        return str(err)
    return None

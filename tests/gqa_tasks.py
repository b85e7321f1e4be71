"""Grouped-query attention task bodies run inside the rank pool (see tp_tasks.py).

Eight query heads with 1, 2, 4 or 8 key/value heads: at TP=4 one key/value
head is replicated on 4 ranks, two on 2 ranks each; four or eight split.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

from dist_mha import GroupQueryAttention
from dist_mha.checkpoint import load_tp_shard, save_tp_shard
from dist_mha.testing import compare_with_reference
from tp_tasks import count_collectives

B, T, S, E, NQ, H = 2, 8, 4, 12, 8, 3


def _keep(*shape, seed=0):
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.7
    m[..., 0] = True
    return m


def gqa_cases():
    """(name, extra layer kwargs, query shape, value shape, key shape, call kwargs, sequence parallel)."""
    return [
        ("self", {}, (B, T, E), None, None, {}, False),
        ("cross_separate_key", {}, (B, T, E), (B, S, 7), (B, S, 6), {}, False),
        ("masks", {}, (B, T, E), (B, S, E), None,
         dict(query_mask=_keep(B, T), value_mask=_keep(B, S, seed=1), attention_mask=_keep(B, T, S, seed=2)), False),
        ("per_head_mask", {}, (B, T, E), (B, S, E), None, dict(attention_mask=_keep(B, NQ, T, S)), False),
        ("causal", {}, (B, T, E), None, None, dict(use_causal_mask=True), False),
        ("causal_window_gate", {"sliding_window": 3, "use_gate": True}, (B, T, E), None, None,
         dict(use_causal_mask=True), False),
        ("window_cross", {"sliding_window": 2}, (B, T, E), (B, S, E), None, dict(value_mask=_keep(B, S)), False),
        ("no_bias_regularized", {"use_bias": False, "kernel_regularizer": "l2", "activity_regularizer": "l1"},
         (B, T, E), (B, S, E), None, {}, False),
        ("sp_self_causal", {}, (B, T, E), None, None, dict(use_causal_mask=True), True),
        ("sp_cross_gate", {"use_gate": True}, (B, T, E), (B, S, E), None, dict(value_mask=_keep(B, S)), True),
        ("dropout_invariant", {"dropout": 0.3, "seed": 5, "dropout_mode": "tp_invariant"}, (B, T, E), None, None,
         dict(use_causal_mask=True), False),
        ("segments_causal", {}, (B, T, E), None, None,
         dict(use_causal_mask=True, segment_ids=torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1], [3, 3, 4, 4, 4, 4, 4, 4]])),
         False),
    ]


def gqa_parity(ctx, tp, nkv, dtype_name, names=None):
    dtype = getattr(torch, dtype_name)
    report = {}
    for name, extra, qs, vs, ks, call, sp in gqa_cases():
        if names is not None and name not in names:
            continue
        kwargs = dict(head_dim=H, num_query_heads=NQ, num_key_value_heads=nkv, **extra)
        try:
            report[name] = compare_with_reference(
                ctx.group(tp), kwargs, qs, vs, ks, call, dtype=dtype, device=ctx.device, sequence_parallel=sp,
                layer_cls=GroupQueryAttention)["max_abs_error"]
        except Exception as err:
            raise AssertionError(f"case {name!r} at TP={tp}, num_key_value_heads={nkv}, {dtype_name}: {err}") from err
    return report


def gqa_comm_counts(ctx, tp, nkv, cross):
    group = ctx.group(tp)
    torch.manual_seed(0)
    layer = GroupQueryAttention(H, NQ, nkv, query_shape=E, tp_group=group, check_ranks=False, device=ctx.device)
    q = torch.randn(B, T, E, device=ctx.device, requires_grad=True)
    v = torch.randn(B, S, E, device=ctx.device, requires_grad=True) if cross else q
    with count_collectives() as fwd:
        out = layer(q, v)
    with count_collectives() as bwd:
        out.sum().backward()
    return {"forward": dict(Counter(n for n, _ in fwd)), "backward": dict(Counter(n for n, _ in bwd)),
            "backward_sizes": bwd, "kv_local_heads": layer._modules["key"].kernel.shape[1],
            "kv_replicas": layer._modules["key"].replicas}


def gqa_sgd_step(ctx, tp, nkv):
    """Full weights after one SGD step (regularizers, a constraint) at TP=tp vs TP=1."""
    kwargs = dict(kernel_regularizer="l2", bias_regularizer="l1", kernel_constraint="unit_norm",
                  activity_regularizer="l2", use_gate=True, bias_initializer="random_normal")
    results = []
    for group in (None, ctx.group(tp)):
        torch.manual_seed(3)
        layer = GroupQueryAttention(H, NQ, nkv, **kwargs, query_shape=E, value_shape=7, tp_group=group,
                                    dtype=torch.float64, device=ctx.device)
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


def gqa_replicas_stay_equal(ctx, tp, nkv):
    """After training steps, every replica of a key/value head holds the same weights (max spread)."""
    group = ctx.group(tp)
    torch.manual_seed(0)
    layer = GroupQueryAttention(H, NQ, nkv, query_shape=E, tp_group=group, dtype=torch.float64)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        opt.zero_grad()
        layer(x, x, use_causal_mask=True).square().sum().backward()
        opt.step()
    spread = 0.0
    for proj in (layer._modules["key"], layer._modules["value"]):
        for p in (proj.kernel, proj.bias):
            gathered = [torch.empty_like(p) for _ in range(tp)]
            dist.all_gather(gathered, p.detach().contiguous(), group=group)
            reps = proj.replicas
            for r in range(tp):
                spread = max(spread, float((gathered[r] - gathered[r - r % reps]).abs().max()))
    return spread


def gqa_init_invariance(ctx, tp, nkv):
    kwargs = dict(use_gate=True, kernel_initializer="glorot_uniform", bias_initializer="random_normal")
    torch.manual_seed(11)
    sharded = GroupQueryAttention(H, NQ, nkv, **kwargs, query_shape=E, value_shape=7, tp_group=ctx.group(tp)).get_weights()
    torch.manual_seed(11)
    single = GroupQueryAttention(H, NQ, nkv, **kwargs, query_shape=E, value_shape=7).get_weights()
    return len(sharded) == len(single) and all(np.array_equal(a, b) for a, b in zip(sharded, single))


def gqa_reshard(ctx, nkv, a, b, directory):
    torch.manual_seed(1)
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kwargs = dict(head_dim=H, num_query_heads=NQ, num_key_value_heads=nkv, use_gate=True, dtype=torch.float64)
    src = GroupQueryAttention(**kwargs, query_shape=E, tp_group=ctx.group(a))
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    src(x, x).sum().backward()  # one step, so the weights are not the initial ones
    opt.step()
    expected = src(x, x).detach()
    if ctx.rank < a:
        save_tp_shard(src.state_dict(), directory, dist.get_rank(ctx.group(a)), a)
    dist.barrier()
    dst = GroupQueryAttention(**kwargs, query_shape=E, tp_group=ctx.group(b))
    dst.load_state_dict(load_tp_shard(directory, b, dist.get_rank(ctx.group(b))))
    got = dst(x, x).detach()
    dist.barrier()
    return float((got - expected).abs().max())


def gqa_bad_tp(ctx, tp, nq, nkv):
    try:
        GroupQueryAttention(2, nq, nkv, query_shape=E, tp_group=ctx.group(tp))
    except ValueError as err:
        return str(err)
    return None


def decode_under_tp(ctx, tp, nkv):
    """DecoderLM at TP=tp: prefill + one token at a time vs its full forward and the TP=1 model's.

    Returns (max |incremental - full|, max |full - TP=1 full|, cache bytes on this rank).
    """
    from dist_mha.models.decoder import DecoderLM

    results = []
    for group in (None, ctx.group(tp)):
        torch.manual_seed(0)
        model = DecoderLM(40, 32, 32, 8, 2, num_kv_heads=nkv, tp_group=group).eval()
        tokens = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            full = model(tokens)
            cache = model.init_cache(3, 16)
            parts = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(5, 16)]
        results.append((full, torch.cat(parts, 1), cache.nbytes))
    (full1, _, _), (full_tp, inc_tp, nbytes) = results
    return float((inc_tp - full_tp).abs().max()), float((full_tp - full1).abs().max()), nbytes

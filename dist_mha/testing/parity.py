"""Public parity harness: a tensor-parallel layer against a single-device reference.

Builds the reference (`tp_group=None`) and the TP layer from the same full
weights, runs both on the same inputs, and compares outputs, input gradients
and every weight gradient (this rank's shard against the same slice of the
reference's). Runs on CPU with gloo, so a configuration can be checked on a
laptop before it goes to a cluster.

Tolerances per dtype: float64 1e-10, float32 1e-5 on outputs and input
gradients; weight gradients sum over batch and positions, so they get 10x.

Example:

>>> from dist_mha.testing import check_tp_parity
>>> report = check_tp_parity(dict(num_heads=4, key_dim=8), (2, 6, 16), tp=2)
>>> report["max_abs_error"]["output"] < 1e-10
True
"""

from __future__ import annotations

import torch

from dist_mha.layers.multi_head_attention import MultiHeadAttention
from dist_mha.parallel.cp import layout as context
from dist_mha.parallel.groups import size_of
from dist_mha.parallel.mesh import axis_arg, is_mesh
from dist_mha.parallel.tp import sharding

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _inputs(shapes, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q_shape, v_shape, k_shape = shapes
    q = torch.randn(q_shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    v = q if v_shape is None else torch.randn(v_shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    k = None if k_shape is None else torch.randn(k_shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return q, v, k


def compare_with_reference(
    group,
    layer_kwargs: dict,
    query_shape,
    value_shape=None,
    key_shape=None,
    call_kwargs: dict | None = None,
    *,
    dtype=torch.float64,
    device="cpu",
    sequence_parallel: bool = False,
    seed: int = 0,
    check: bool = True,
    layer_cls=None,
    cp_group=None,
    cp_mode: str = "ring",
) -> dict:
    """Runs on every rank of `group` (and `cp_group`): the parallel layer vs a reference; returns max errors.

    Args:
        group: the TP process group, or a 1-D DeviceMesh (DTensor parameters; every rank of it must call this).
        layer_kwargs: `MultiHeadAttention` constructor arguments.
        query_shape, value_shape, key_shape: full input shapes (value None:
            self-attention on the query tensor).
        call_kwargs: call arguments (masks as tensors on CPU are moved).
        dtype, device: of weights and inputs.
        sequence_parallel: shard inputs/outputs on dim 1.
        seed: seeds weights, inputs and the output probe.
        check: raise AssertionError when a tolerance is exceeded.
        layer_cls: the layer class (default `MultiHeadAttention`; e.g.
            `GroupQueryAttention`, whose `layer_kwargs` are its own).
        cp_group, cp_mode: context parallelism: inputs and outputs are this
            rank's `shard_sequence` parts; weight gradients are summed over
            `cp_group` first (what data-parallel training does).

    Returns:
        `{"max_abs_error": {"output", "input_grads", "weight_grads"}, "backend": name}`.
    """
    call_kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in (call_kwargs or {}).items()}
    tp_arg, cp_arg = group, cp_group  # the layer takes them as given: DeviceMesh axes make DTensor parameters
    group, cp_group = axis_arg("group", group)[0], axis_arg("cp_group", cp_group)[0]
    use_mesh = is_mesh(tp_arg) or is_mesh(cp_arg)
    torch.manual_seed(seed)
    v_shape = value_shape or query_shape
    layer_cls = layer_cls or MultiHeadAttention
    ref = layer_cls(**layer_kwargs, query_shape=query_shape, value_shape=v_shape, key_shape=key_shape,
                             dtype=dtype, device=device)
    extra = {} if cp_group is None else {"cp_group": cp_arg, "cp_mode": cp_mode}
    tp = layer_cls(**layer_kwargs, query_shape=query_shape, value_shape=v_shape, key_shape=key_shape,
                   dtype=dtype, device=device, tp_group=tp_arg, sequence_parallel=sequence_parallel, **extra)
    tp.set_weights(ref.get_weights())
    q, v, k = _inputs((query_shape, value_shape, key_shape), dtype, device, seed)
    distinct = [x for i, x in enumerate((q, v, k)) if x is not None and all(x is not y for y in (q, v, k)[:i])]

    def local(x):
        """This rank's part of a full (B, T, ...) tensor."""
        if cp_group is not None:
            return context.shard_sequence(x, cp_group, 1)
        return sharding.own_slice(x, 1, group) if sequence_parallel else x

    def run(layer, xs, shard):
        leaves = [(local(x) if shard else x).detach().clone().requires_grad_() for x in xs]
        by_id = {id(x): leaf for x, leaf in zip(xs, leaves)}
        out = layer(by_id[id(q)], by_id[id(v)], None if k is None else by_id[id(k)], **call_kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out, leaves

    ref_out, ref_leaves = run(ref, distinct, False)
    probe = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype=dtype, device=device)
    (ref_out * probe).sum().backward()
    tp_out, tp_leaves = run(tp, distinct, True)
    (tp_out * local(probe)).sum().backward()

    def err(a, b):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0

    errors = {"output": err(tp_out.detach(), local(ref_out).detach())}
    errors["input_grads"] = max(err(t.grad, local(r.grad)) for t, r in zip(tp_leaves, ref_leaves))
    w_errs = []
    local_grads = {}
    if use_mesh:
        from dist_mha.parallel.dtensor import local_grads as dtensor_local_grads

        local_grads = dtensor_local_grads(tp)
    for w_tp, w_ref in zip(tp._keras_weights(), ref._keras_weights()):
        grad = local_grads.get(id(w_tp.param), w_tp.param.grad)
        if use_mesh and cp_group is not None:
            grad = grad * size_of(cp_group)  # DTensor gradients average over CP; the reference sums the tokens
        elif cp_group is not None:
            grad = grad.clone()
            torch.distributed.all_reduce(grad, group=cp_group)
        w_errs.append(err(grad, sharding.own_slice(w_ref.param.grad, w_tp.dim, group, w_tp.replicas)))
    errors["weight_grads"] = max(w_errs)
    if check:
        tol = TOLERANCE[dtype]
        limits = {"output": tol, "input_grads": tol, "weight_grads": 10 * tol}
        bad = {k: v for k, v in errors.items() if not v <= limits[k] * max(1.0, _scale(k, ref_out, ref))}
        if bad:
            layout = f"TP={size_of(group)}" + (f" x CP={size_of(cp_group)} ({cp_mode})" if cp_group is not None else "")
            raise AssertionError(f"{layout} differs from the reference beyond tolerance {tol}: {bad}")
    return {"max_abs_error": errors, "backend": tp.last_backend}


def _scale(kind, ref_out, ref) -> float:
    """Absolute tolerances are relative to the magnitude of what is compared."""
    if kind == "output":
        return ref_out.detach().abs().max().item()
    return max(p.grad.abs().max().item() for p in ref.weights)


def _pool_task(ctx, tp, cp, *args, **kwargs):
    if cp == 1:
        return compare_with_reference(ctx.group(tp), *args, **kwargs)
    tp_group, cp_group = ctx.grid(tp, cp)
    return compare_with_reference(tp_group, *args, cp_group=cp_group, **kwargs)


def check_tp_parity(layer_kwargs, query_shape, value_shape=None, key_shape=None, call_kwargs=None, *, tp=2,
                    dtype=torch.float64, sequence_parallel=False, seed=0, pool=None, device="cpu",
                    layer_cls=None, cp=1, cp_mode="ring") -> dict:
    """Spawns `tp * cp` gloo ranks (or uses `pool`) and runs `compare_with_reference` on them.

    With `cp > 1` the layer runs TP x CP (TP ranks contiguous) in `cp_mode`,
    on `shard_sequence` parts of the inputs (global lengths divisible by 2 * cp).
    Call it from a script's `if __name__ == "__main__":` block: the ranks are
    spawned processes that import the main module.

    Returns:
        Rank 0's report; raises AssertionError (inside a `RankError`) on a mismatch.
    """
    from dist_mha.testing.pool import RankPool

    own = pool is None
    grids = ((tp, cp),) if cp > 1 else ()
    pool = pool or RankPool(world_size=tp * cp, tp_sizes=(tp,), device=device, grids=grids)
    try:
        return pool.run(_pool_task, tp, cp, layer_kwargs, query_shape, value_shape, key_shape, call_kwargs,
                        dtype=dtype, sequence_parallel=sequence_parallel, seed=seed, device=device,
                        layer_cls=layer_cls, **({"cp_mode": cp_mode} if cp > 1 else {}))[0]
    finally:
        if own:
            pool.close()

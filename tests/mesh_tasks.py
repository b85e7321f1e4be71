"""Task bodies for tests/test_mesh.py, run in the 4-rank pool: DeviceMesh axes, DTensor parameters, FSDP2, DCP.

Every comparison is against one device: a reference model built in the same
process from the same seed (initialisation does not depend on the layout)
and trained on the whole batch, in float64. Each rank's loss is the mean over
its own rows and tokens (equal counts), so averaging gradients over DP
(FSDP) and CP (the DTensor gradient placement) gives the global mean.

Shape legend: B batch rows, T tokens, E embed dim, V vocabulary.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from dist_mha import MultiHeadAttention, TransformerBlock
from dist_mha.checkpoint import dcp as dist_dcp
from dist_mha.models.decoder import DecoderLM
from dist_mha.parallel import build_parallel_state, shard_sequence

B, T, E, V = 4, 8, 16, 32
F64 = torch.float64
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)  # full_tensor() of 2-D shards


def state(ctx, tp, cp=1):
    """This rank's `ParallelState` for a TP x CP layout (built once per pool worker)."""
    key = ("state", tp, cp)
    if key not in ctx.scratch:
        ctx.scratch[key] = build_parallel_state(tp, cp)
    return ctx.scratch[key]


def _build(kind, st=None, *, nkv=None, dropout=0.0, sp=False, seed=0):
    """The model on `st`'s mesh axes (None: one device)."""
    axes = {} if st is None else {"tp_group": st.mesh["tp"], "cp_group": st.mesh["cp"] if st.cp_size > 1 else None}
    torch.manual_seed(seed)
    if kind == "block":
        return TransformerBlock(E, 4, num_kv_heads=nkv, mlp_ratio=2, dropout=dropout, attention_dropout=dropout,
                                sequence_parallel=sp, seed=7, dtype=F64, **axes)
    return DecoderLM(V, T, E, 4, 2, 2, dropout, dropout, num_kv_heads=nkv, sequence_parallel=sp, seed=7, dtype=F64,
                     **axes)


def _shard(model, st, ac=False):
    """`checkpoint_wrapper` (optional) and `fully_shard` per block, then on the root, over `mesh["dp"]`."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard

    dp = st.mesh["dp"]
    if isinstance(model, TransformerBlock):
        return fully_shard(checkpoint_wrapper(model) if ac else model, mesh=dp)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = fully_shard(checkpoint_wrapper(block) if ac else block, mesh=dp)
    return fully_shard(model, mesh=dp)


def _batch(kind, step):
    g = torch.Generator().manual_seed(100 + step)
    if kind == "block":
        return torch.randn(B, T, E, generator=g, dtype=F64), torch.randn(B, T, E, generator=g, dtype=F64)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def _local(t, st):
    """This rank's rows (DP) and part of the sequence (CP)."""
    if st is None:
        return t
    rows = B // st.dp_size
    t = t[st.dp_rank * rows:(st.dp_rank + 1) * rows]
    return shard_sequence(t, st.cp_group, 1) if st.cp_size > 1 else t


def _loss(kind, model, step, st):
    a, b = (_local(t, st) for t in _batch(kind, step))
    if kind == "block":
        return (model(a) * b).mean()
    return F.cross_entropy(model(a).reshape(-1, V), b.reshape(-1))


def clipped_step(model, opt, loss) -> float:
    """One AdamW step from `loss` with clipping active (max norm 0.05); returns the clip norm as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    opt.step()
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def _step(kind, model, opt, step, st):
    return clipped_step(model, opt, _loss(kind, model, step, st))


_opt = adamw


def _clean(name):
    return name.replace("_checkpoint_wrapped_module.", "")


def _full(model):
    """`{name: full tensor}` of the parameters (DTensors gathered)."""
    return {_clean(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def _max_err(a: dict, b: dict):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def fsdp_step(ctx, kind, tp, cp, nkv=None, sp=False, mode="fsdp2"):
    """One step at DP x CP x TP against one device: parameter error, clip-norm error, placements.

    `mode`: "fsdp2" (`fully_shard` over `mesh["dp"]`) or "ddp" (the training app's DDP on the mesh:
    DTensor gradients reduced to their placements and averaged over DP, `train.fsdp.reduce_mesh_grads`).
    """
    st = state(ctx, tp, cp)
    ref = _build(kind, nkv=nkv)
    ref_norm = _step(kind, ref, _opt(ref), 0, None)
    model = _build(kind, st, nkv=nkv, sp=sp)
    if mode == "fsdp2":
        model = _shard(model, st)
        norm = _step(kind, model, _opt(model), 0, st)
    else:
        from dist_mha.train.fsdp import reduce_mesh_grads

        opt = _opt(model)
        _loss(kind, model, 0, st).backward()
        reduce_mesh_grads(list(model.parameters()), st)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05).full_tensor().item()
        opt.step()
    kinds = sorted({str(tuple(p.placements)) for p in model.parameters()})
    meshes = sorted({str(p.device_mesh.mesh_dim_names) for p in model.parameters()})
    return {"param": _max_err(_full(model), _full(ref)), "norm": abs(norm - ref_norm), "norm_value": norm,
            "placements": kinds, "meshes": meshes}


def _optim_full(model, opt):
    out = {}
    names = {id(p): _clean(n) for n, p in model.named_parameters()}
    for p, s in opt.state.items():
        for field in ("exp_avg", "exp_avg_sq"):
            v = s[field]
            out[f"{field}.{names[id(p)]}"] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
    return out


LOAD_LAYOUTS = [(2, 1), (4, 1), (1, 1), (1, 2)]  # (tp, cp) on 4 ranks: same, TP4, DP4 x TP1, DP2 x CP2


def dcp_reshard(ctx, directory, nkv=1):
    """Saves a DecoderLM (FSDP2, DP2 x TP2, one key/value head: replicated over TP) after one step; loads it at
    each of `LOAD_LAYOUTS` and steps again."""
    kind = "lm"
    ref = _build(kind, nkv=nkv)
    ref_opt = _opt(ref)
    _step(kind, ref, ref_opt, 0, None)
    st = state(ctx, 2, 1)
    model = _shard(_build(kind, st, nkv=nkv), st)
    opt = _opt(model)
    _step(kind, model, opt, 0, st)
    saved, saved_opt = _full(model), _optim_full(model, opt)
    dist_dcp.save(directory, model, opt, meta={"step": 1})
    _step(kind, ref, ref_opt, 1, None)
    ref_after = _full(ref)
    report = {}
    for tp, cp in LOAD_LAYOUTS:
        st = state(ctx, tp, cp)
        fresh = _shard(_build(kind, st, nkv=nkv, seed=1), st)  # another init: the load must replace it
        fresh_opt = _opt(fresh)
        meta = dist_dcp.load(directory, fresh, fresh_opt)
        loaded = {"param": _max_err(_full(fresh), saved), "optim": _max_err(_optim_full(fresh, fresh_opt), saved_opt),
                  "meta": meta}
        _step(kind, fresh, fresh_opt, 1, st)
        loaded["step2"] = _max_err(_full(fresh), ref_after)
        report[f"tp{tp}cp{cp}"] = loaded
    # Full (unsharded) weights, as a Hugging Face import has them, go into the sharded model on every rank.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    fresh = _shard(_build(kind, state(ctx, 2, 1), nkv=nkv, seed=1), state(ctx, 2, 1))
    full_sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("_extra_state")}
    set_model_state_dict(fresh, full_sd, options=StateDictOptions(full_state_dict=True, strict=False))
    report["full_state_dict"] = {"param": _max_err(_full(fresh), ref_after)}
    return report


def ac_dropout(ctx, kind, tp, cp):
    """Gradients of an FSDP2 step with dropout on, with and without `checkpoint_wrapper` per block."""
    st = state(ctx, tp, cp)
    grads, calls = [], []
    for ac in (False, True):
        model = _shard(_build(kind, st, dropout=0.2), st, ac=ac)
        n = [0]
        for m in model.modules():
            if isinstance(m, MultiHeadAttention):
                m.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        _loss(kind, model, 0, st).backward()
        grads.append({_clean(k): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                      for k, p in model.named_parameters()})
        calls.append(n[0])
    plain = _build(kind, st, dropout=0.0)
    _loss(kind, _shard(plain, st), 0, st).backward()
    no_dropout = {_clean(k): p.grad.full_tensor() for k, p in plain.named_parameters()}
    return {"ac_vs_plain": _max_err(grads[1], grads[0]), "dropout_effect": _max_err(grads[0], no_dropout),
            "attention_calls": calls}


def mesh_errors(ctx):
    """The messages of bad mesh arguments (each must raise ValueError before any collective)."""
    st = state(ctx, 2, 1)
    out = {}
    cases = {
        "two_dims": lambda: MultiHeadAttention(4, 4, query_shape=E, tp_group=st.mesh["dp", "tp"]),
        "mixed": lambda: MultiHeadAttention(4, 4, query_shape=E, tp_group=st.mesh["tp"], cp_group=st.dp_group),
        "heads": lambda: MultiHeadAttention(3, 4, query_shape=E, tp_group=st.mesh["tp"]),
        "block_two_dims": lambda: TransformerBlock(E, 4, tp_group=st.mesh["dp", "tp"]),
        "lazy": lambda: MultiHeadAttention(4, 4, tp_group=st.mesh["tp"]),
    }
    for name, make in cases.items():
        try:
            make()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


SHORT_LIST = ("self", "cross", "value_key_masks", "causal", "no_bias_gate", "sp_self", "dropout_invariant")


def layer_parity(ctx):
    """`compare_with_reference` on mesh axes: every TP case of tests/tp_tasks.py, GQA, and TP x CP."""
    import tp_tasks
    from dist_mha import GroupQueryAttention
    from dist_mha.testing import compare_with_reference

    report = {}
    for tp, cp in ((2, 1), (4, 1), (2, 2), (1, 2)):
        st = state(ctx, tp, cp)
        cp_mesh = st.mesh["cp"] if cp > 1 else None
        errors = {}
        for name, kwargs, qs, vs, ks, call, sp in tp_tasks.parity_cases():
            if cp > 1 and (sp or len(qs) != 3):  # CP: rank-3 inputs, no sequence parallelism
                continue
            if (tp, cp) != (2, 1) and name not in SHORT_LIST:  # every case at TP2; the others repeat a few
                continue
            r = compare_with_reference(st.mesh["tp"], kwargs, qs, vs, ks, call, dtype=F64, sequence_parallel=sp,
                                       cp_group=cp_mesh)
            errors[name] = max(r["max_abs_error"].values())
        for nkv in (1, 2, 4):  # key/value heads replicated (nkv < tp) or split
            r = compare_with_reference(st.mesh["tp"], dict(head_dim=3, num_query_heads=4, num_key_value_heads=nkv),
                                       (2, 8, 12), layer_cls=GroupQueryAttention, cp_group=cp_mesh,
                                       call_kwargs=dict(use_causal_mask=True))
            errors[f"gqa_kv{nkv}"] = max(r["max_abs_error"].values())
        # Issue 17's weights on a mesh: QK-norm scales (replicated) and sinks (sharded with the heads).
        r = compare_with_reference(st.mesh["tp"], dict(head_dim=4, num_query_heads=4, num_key_value_heads=2,
                                                       rope={"rope_type": "default"}, qk_norm="rms",
                                                       attention_sinks=True),
                                   (2, 8, 12), layer_cls=GroupQueryAttention, cp_group=cp_mesh,
                                   call_kwargs=dict(use_causal_mask=True))
        errors["rope_qk_norm_sinks"] = max(r["max_abs_error"].values())
        report[f"tp{tp}" + (f"cp{cp}" if cp > 1 else "")] = errors
    return report


def fsdp_steps(ctx, cases):
    return [fsdp_step(ctx, *case) for case in cases]


AC_LAYOUTS = [("lm", 2, 1), ("block", 1, 2), ("lm", 4, 1), ("lm", 1, 1)]


def ac_dropout_layouts(ctx):
    return {f"{kind}_tp{tp}cp{cp}": ac_dropout(ctx, kind, tp, cp) for kind, tp, cp in AC_LAYOUTS}


def per_rank_checkpoint(ctx, directory):
    """A TP2 mesh layer (one key/value head: replicated) saved per rank, loaded at TP4 (mesh and process group)."""
    import torch.distributed as dist

    from dist_mha import GroupQueryAttention
    from dist_mha.checkpoint import load_tp_shard, save_tp_shard
    from dist_mha.parallel.dtensor import load_local_state_dict, local_state_dict

    def make(group, seed):
        torch.manual_seed(seed)
        return GroupQueryAttention(3, 4, 1, query_shape=12, tp_group=group, dtype=F64, dropout=0.3, seed=seed)

    x = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(5), dtype=F64)
    st2, st4 = state(ctx, 2), state(ctx, 4)
    saved = make(st2.mesh["tp"], 0)
    saved(x, x)  # moves the dropout streams on
    full = saved.get_weights()
    sd = local_state_dict(saved)
    if st2.dp_rank == 0:
        save_tp_shard(sd, directory, st2.tp_rank, 2)
    dist.barrier()
    errors = {}
    for name, group in (("mesh_tp4", st4.mesh["tp"]), ("group_tp4", ctx.group(4)), ("mesh_tp2", st2.mesh["tp"])):
        layer = make(group, 1)
        tp, rank = (4, st4.tp_rank) if "tp4" in name else (2, st2.tp_rank)
        loaded = load_tp_shard(directory, tp, rank)
        if name.startswith("mesh"):
            load_local_state_dict(layer, loaded)
        else:
            layer.load_state_dict(loaded)
        errors[name] = max(abs(a - b).max() for a, b in zip(layer.get_weights(), full))
    # Same layout: the per-rank dropout streams continue where they were.
    layer = make(st2.mesh["tp"], 1)
    load_local_state_dict(layer, load_tp_shard(directory, 2, st2.tp_rank))
    errors["same_layout_dropout"] = (layer(x, x) - saved(x, x)).abs().max().item()
    return errors


def keras_api_on_mesh(ctx):
    """Penalties, their gradients and constraints of a TP2 mesh layer (one key/value head: replicated) vs groups."""
    from dist_mha import GroupQueryAttention

    st = state(ctx, 2)

    def make(group):
        torch.manual_seed(0)
        return GroupQueryAttention(3, 4, 1, query_shape=12, tp_group=group, dtype=F64, kernel_regularizer="l2",
                                   bias_regularizer="l1", kernel_constraint="max_norm")

    mesh_layer, group_layer = make(st.mesh["tp"]), make(ctx.group(2))
    full = [w * 3 for w in group_layer.get_weights()]  # large enough for max_norm to act
    errors = {}
    for layer in (mesh_layer, group_layer):
        layer.set_weights(full)
        sum(layer.losses).backward()
    errors["losses"] = abs(sum(mesh_layer.losses).item() - sum(group_layer.losses).item())
    from dist_mha.parallel.dtensor import local_grads

    grads = local_grads(mesh_layer)
    errors["penalty_grads"] = max((grads[id(a.param)] - b.param.grad).abs().max().item()
                                  for a, b in zip(mesh_layer._keras_weights(), group_layer._keras_weights()))
    for layer in (mesh_layer, group_layer):
        layer.apply_constraints()
    errors["constrained"] = float(max(abs(a - b).max() for a, b in zip(mesh_layer.get_weights(),
                                                                        group_layer.get_weights())))
    # Every TP rank holds the whole replicated key kernel, equal to the full weight (what DCP saves once).
    key = mesh_layer._modules["key"].kernel
    errors["replicated_key_kernel"] = (key.to_local() - torch.as_tensor(mesh_layer.get_weights()[2])).abs().max().item()
    errors["changed_by_constraint"] = -float(max(abs(a - b).max() for a, b in zip(full, group_layer.get_weights())))
    return errors

"""Task bodies for tests/test_hf_mesh.py, run in the 4-rank pool: `from_hf` models on DeviceMesh axes.

Every layout uses all four ranks (DP = 4 / (tp * cp)); the parallel states
(and their meshes) are `mesh_tasks.state`'s, shared with tests/test_mesh.py.
References: the same checkpoint loaded on the state's process groups (the
computation a mesh model must repeat exactly), one device (`from_hf(path)`),
and transformers' logits computed in the parent.

Shape legend: B batch rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard

from dist_mha.parallel import gather_sequence, shard_sequence
from mesh_tasks import adamw, clipped_step, state

F64 = torch.float64
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)  # full_tensor() of 2-D shards


def _axes(st, mesh: bool) -> dict:
    """`tp_group`/`cp_group` of `st`: mesh axes or the process groups they were built from."""
    if mesh:
        return {"tp_group": st.mesh["tp"], "cp_group": st.mesh["cp"] if st.cp_size > 1 else None}
    return {"tp_group": st.tp_group, "cp_group": st.cp_group if st.cp_size > 1 else None}


def _logits(model, ids, st):
    """Full-sequence logits of `ids` (this rank's part under CP, gathered back)."""
    with torch.no_grad():
        if st.cp_size == 1:
            return model(ids)
        return gather_sequence(model(shard_sequence(ids, st.cp_group, 1)), st.cp_group)


def _full(model) -> dict:
    """`{name: full tensor}` of the parameters (DTensors gathered)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def _max_err(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _placements_ok(model, tp: int) -> bool:
    """Every parameter a DTensor; norms replicated; a split vocabulary `Shard(0)`, MLP gate rows `Shard(0)`."""
    tp_dim = -1  # the TP axis is the last dim of the parameter mesh
    ok = all(isinstance(p, DTensor) for p in model.parameters())
    ok &= model.norm.weight.placements[tp_dim] == Replicate()
    want = Shard(0) if (model.embed.split and tp > 1) else Replicate()
    ok &= model.embed.weight.placements[tp_dim] == want
    mlp = model.blocks[0].mlp
    ok &= mlp.gate.weight.placements[tp_dim] == (Shard(0) if tp > 1 else Replicate())
    ok &= mlp.down.weight.placements[tp_dim] == (Shard(1) if tp > 1 else Replicate())
    return bool(ok)


def logits_parity(ctx, cases, ids) -> dict:
    """`{(family, layout): errors}`: the mesh model against the process-group one, weights against one device.

    `cases`: `[(family, path, [(tp, cp, cp_mode, sequence_parallel), ...])]`.
    """
    from dist_mha.models import from_hf

    out = {}
    for family, path, layouts in cases:
        single = _full(from_hf(path))
        for tp, cp, mode, sp in layouts:
            st = state(ctx, tp, cp)
            kw = dict(cp_mode=mode, sequence_parallel=sp)
            ours, theirs = from_hf(path, **_axes(st, True), **kw), from_hf(path, **_axes(st, False), **kw)
            y = _logits(ours, ids, st)
            r = out[(family, (tp, cp, mode, sp))] = {
                "vs_groups": (y - _logits(theirs, ids, st)).abs().max().item(),
                "weights_vs_one_device": _max_err(_full(ours), single),
                "placements": _placements_ok(ours, tp),
                "logits": y,
            }
            if not sp and cp == 1:  # KV-cache decoding runs without SP and CP
                from dist_mha.models.generation import generate

                r["same_tokens"] = torch.equal(generate(ours, ids[:, :4], 6), generate(theirs, ids[:, :4], 6))
    return out


def _loss(model, ids, st, B):
    """Cross-entropy of next-token prediction: the mean over this rank's rows and tokens."""
    rows = B // st.dp_size if st is not None else B
    local = ids if st is None else ids[st.dp_rank * rows:(st.dp_rank + 1) * rows]
    x, y = local[:, :-1], local[:, 1:]
    if st is not None and st.cp_size > 1:
        x, y = shard_sequence(x, st.cp_group, 1), shard_sequence(y, st.cp_group, 1)
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _step(model, opt, ids, st, B) -> float:
    return clipped_step(model, opt, _loss(model, ids, st, B))


_opt = adamw


def _sharded(path, st, sp=False):
    """`from_hf` on `st`'s mesh axes, `fully_shard` per block and on the root (the training app's `fsdp.shard`)."""
    from dist_mha.models import from_hf
    from dist_mha.train import fsdp

    return fsdp.shard(from_hf(path, **_axes(st, True), sequence_parallel=sp).train(), st, None)


def _optim_full(model, opt) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {f"{f}.{names[id(p)]}": (s[f].full_tensor() if isinstance(s[f], DTensor) else s[f]).clone()
            for p, s in opt.state.items() for f in ("exp_avg", "exp_avg_sq")}


def fsdp_steps(ctx, cases, ids) -> dict:
    """`{case: errors}`: one FSDP2 AdamW step against one device. `cases`: `[(name, path, tp, cp, sp)]`."""
    from dist_mha.models import from_hf

    B = ids.shape[0]
    out = {}
    for name, path, tp, cp, sp in cases:
        ref = from_hf(path).train()
        ref_norm = _step(ref, _opt(ref), ids, None, B)
        st = state(ctx, tp, cp)
        model = _sharded(path, st, sp)
        norm = _step(model, _opt(model), ids, st, B)
        meshes = {p.device_mesh.mesh_dim_names for p in model.parameters()}
        out[name] = {"param": _max_err(_full(model), _full(ref)), "norm": abs(norm - ref_norm), "norm_value": norm,
                     "meshes": sorted(meshes)}
    return out


def dcp_and_export(ctx, path, ids, directory, out_dirs) -> dict:
    """A stepped FSDP2 model (DP2 x TP2): DCP into TP4 (bitwise?), and `to_hf` of the mesh models.

    `out_dirs`: `{"groups", "mesh", "trained"}` directories for `to_hf` of the loaded process-group model,
    the loaded mesh model (before `fully_shard`), and the stepped FSDP2 model.
    """
    from dist_mha.checkpoint import dcp
    from dist_mha.models import from_hf, to_hf

    B = ids.shape[0]
    st = state(ctx, 2, 1)
    to_hf(from_hf(path, **_axes(st, False)), out_dirs["groups"])  # every rank: the gathers are collective
    to_hf(from_hf(path, **_axes(st, True)), out_dirs["mesh"])
    model = _sharded(path, st)
    opt = _opt(model)
    _step(model, opt, ids, st, B)
    saved, saved_opt = _full(model), _optim_full(model, opt)
    dcp.save(directory, model, opt, meta={"step": 1})
    report = {}
    for tp, cp in ((4, 1),):
        st2 = state(ctx, tp, cp)
        fresh = _sharded(path, st2)  # the source's weights: the load must replace them
        fresh_opt = _opt(fresh)
        meta = dcp.load(directory, fresh, fresh_opt)
        report[f"tp{tp}cp{cp}"] = {"param": _max_err(_full(fresh), saved),
                                   "optim": _max_err(_optim_full(fresh, fresh_opt), saved_opt), "meta": meta}
    to_hf(model, out_dirs["trained"])  # FSDP-sharded: gathered over DP and TP
    report["trained_logits"] = _logits(model.eval(), ids, st)
    return report


def mesh_errors(ctx, path) -> dict:
    """The ValueErrors of bad mesh arguments to `from_hf` and of a DTensor table used outside a forward."""
    from dist_mha.models import from_hf
    from dist_mha.parallel.tp.vocab import VocabParallelEmbedding, vocab_logits

    st = state(ctx, 2, 1)
    table = VocabParallelEmbedding(64, 16, tp_group=st.mesh["tp"])
    cases = {"mixed": lambda: from_hf(path, tp_group=st.mesh["tp"], cp_group=st.dp_group),
             "two_dims": lambda: from_hf(path, tp_group=st.mesh["dp", "tp"]),
             "logits_outside_forward": lambda: vocab_logits(table, torch.zeros(1, 2, 16))}
    out = {}
    for name, make in cases.items():
        try:
            make()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def parts_on_mesh(ctx) -> dict:
    """`GatedMLP`, `RMSNorm` and the vocabulary tables alone on the TP mesh axis (SP) against one device.

    Each part's own hook must put its local tensors in place; every gradient, gathered from its DTensor,
    must be the one-device gradient (a wrong `partial_grad` would double the norm's under SP).
    """
    from dist_mha.models.mlp import GatedMLP
    from dist_mha.models.norms import RMSNorm
    from dist_mha.parallel.tp.vocab import VocabParallelEmbedding, VocabParallelHead

    st = state(ctx, 2, 1)
    tp = st.mesh["tp"]
    B, T, E, V = 2, 8, 16, 64
    g = torch.Generator().manual_seed(0)
    x, up = torch.randn(B, T, E, generator=g, dtype=F64), torch.randn(B, T, E, generator=g, dtype=F64)
    ids = torch.randint(0, V, (B, T), generator=g)
    sp = dict(tp_group=tp, sequence_parallel=True)
    kw = dict(init_base=3, dtype=F64)
    pairs = {"mlp": (GatedMLP(E, 32, bias=True, **kw), GatedMLP(E, 32, bias=True, **kw, **sp)),
             "norm": (RMSNorm(E, dtype=F64), RMSNorm(E, dtype=F64, **sp)),
             "embed": (VocabParallelEmbedding(V, E, salt=1, **kw), VocabParallelEmbedding(V, E, salt=1, **kw, **sp)),
             "head": (VocabParallelHead(V, E, salt=2, **kw), VocabParallelHead(V, E, salt=2, **kw, **sp))}
    with torch.no_grad():
        w = torch.randn(E, generator=g, dtype=F64)
        pairs["norm"][0].weight.copy_(w)
        pairs["norm"][1].weight.to_local().copy_(w)
    out = {}
    rows = slice(st.tp_rank * T // 2, (st.tp_rank + 1) * T // 2)  # this rank's sequence shard under SP
    for name, (ref, ours) in pairs.items():
        # SP: the embedding takes full ids and returns this rank's rows; the head takes this rank's rows
        # and returns full logits; the MLP and the norm keep this rank's rows.
        a = ids if name == "embed" else x
        y_ref, y = ref(a), ours(a if name == "embed" else a[:, rows])
        grad = up if name != "head" else torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1),
                                                     dtype=F64)
        y_ref.backward(grad)
        y.backward(grad if name == "head" else grad[:, rows])
        want = y_ref if name == "head" else y_ref[:, rows]
        out[name] = max((y - want).abs().max().item(),
                        *((p.grad.full_tensor() - q.grad).abs().max().item()
                          for p, q in zip(ours.parameters(), ref.parameters())))
    return out

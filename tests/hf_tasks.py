"""Task bodies for the Hugging Face model tests, run inside the rank pool (see tp_tasks.py)."""

from __future__ import annotations

import torch

from dist_mha.parallel import gather_sequence, shard_sequence
from dist_mha.parallel.collectives import gather_from_tp
from dist_mha.parallel.groups import size_of


def _grad_full(p, group):
    """The full gradient of a possibly row/column-sharded parameter (`tensor_model_parallel` says which)."""
    if not getattr(p, "tensor_model_parallel", False) or size_of(group) == 1:
        return p.grad
    dim = getattr(p, "_hf_test_dim", 0)
    return gather_from_tp(group, p.grad, dim)


def parts_parity(ctx, tp: int, sequence_parallel: bool) -> dict:
    """GatedMLP and the vocabulary tables at TP=`tp` against TP=1 (float64): outputs and every gradient."""
    from dist_mha.models.mlp import GatedMLP
    from dist_mha.parallel.tp.vocab import VocabParallelEmbedding, VocabParallelHead, vocab_logits

    group = ctx.group(tp)
    errors = {}
    B, T, E = 2, 8, 16
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    grad_full = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    # -- MLP: gate/up rows sharded, down columns.
    par = dict(tp_group=group, sequence_parallel=sequence_parallel, init_base=7, dtype=torch.float64)
    ref = GatedMLP(E, 32, activation="gelu_pytorch_tanh", bias=True, init_base=7, dtype=torch.float64)
    mlp = GatedMLP(E, 32, activation="gelu_pytorch_tanh", bias=True, **par)
    mlp.down.weight._hf_test_dim = 1
    x_ref = x_full.clone().requires_grad_()
    x_local = (shard_sequence_tp(x_full, group) if sequence_parallel else x_full).clone().requires_grad_()
    y_ref, y = ref(x_ref), mlp(x_local)
    y_ref.backward(grad_full)
    y.backward(shard_sequence_tp(grad_full, group) if sequence_parallel else grad_full)
    y_all = gather_seq_tp(y, group) if sequence_parallel else y
    errors["mlp_out"] = (y_all - y_ref).abs().max().item()
    dx = gather_seq_tp(x_local.grad, group) if sequence_parallel else x_local.grad
    errors["mlp_dx"] = (dx - x_ref.grad).abs().max().item()
    for (name, p), q in zip(mlp.named_parameters(), ref.parameters()):
        errors[f"mlp_d{name}"] = (_grad_full(p, group) - q.grad).abs().max().item()
    # -- vocabulary: split (128 rows) and replicated (130 rows at TP=4), tied and untied.
    for V in (128, 130):
        ids = torch.randint(0, V, (B, T), generator=g)
        for tied in (True, False):
            kw = dict(init_base=3, dtype=torch.float64)
            r_emb, r_head = VocabParallelEmbedding(V, E, **kw, salt=1), VocabParallelHead(V, E, **kw, salt=2)
            emb = VocabParallelEmbedding(V, E, tp_group=group, sequence_parallel=sequence_parallel, **kw, salt=1)
            head = VocabParallelHead(V, E, tp_group=group, sequence_parallel=sequence_parallel, **kw, salt=2)
            r_out = vocab_logits(r_emb if tied else r_head, torch.tanh(r_emb(ids)))
            out = vocab_logits(emb if tied else head, torch.tanh(emb(ids)))
            seed = torch.Generator().manual_seed(V)
            up = torch.randn(r_out.shape, generator=seed, dtype=torch.float64)
            r_out.backward(up)
            out.backward(up)
            key = f"V{V}_{'tied' if tied else 'untied'}"
            errors[key + "_logits"] = (out - r_out).abs().max().item()
            errors[key + "_split"] = float(emb.split)
            for mine, theirs, n in ((emb, r_emb, "emb"), (head, r_head, "head")):
                if theirs.weight.grad is not None:
                    errors[f"{key}_d{n}"] = (_grad_full(mine.weight, group) - theirs.weight.grad).abs().max().item()
    return errors


def shard_sequence_tp(x, group):
    """This TP rank's contiguous part of dim 1 (sequence parallelism's layout)."""
    return x.chunk(size_of(group), dim=1)[group.rank()] if size_of(group) > 1 else x


def gather_seq_tp(x, group):
    return gather_from_tp(group, x, 1)



def _groups(ctx, tp, cp):
    return ctx.grid(tp, cp) if cp > 1 else (ctx.group(tp), None)


def model_parity(ctx, checkpoints: dict, ids, segment_ids, layouts) -> dict:
    """`{(family, dtype, layout): max |ours - transformers|}` for plain and packed rows.

    `checkpoints[(family, dtype)] = (path, reference logits, packed reference logits)`;
    a layout is `(tp, cp, cp_mode, sequence_parallel)`; packed rows run where `segment_ids` is given.
    """
    from dist_mha.models import from_hf

    out = {}
    for (family, dtype), (path, ref, ref_packed) in checkpoints.items():
        for layout in layouts:
            tp, cp, mode, sp = layout
            if ctx.rank >= tp * cp:
                continue  # the other ranks would repeat the first group's work
            tp_group, cp_group = _groups(ctx, tp, cp)
            model = from_hf(path, tp_group=tp_group, cp_group=cp_group, cp_mode=mode, sequence_parallel=sp)
            with torch.no_grad():
                local = shard_sequence(ids, cp_group) if cp_group is not None else ids
                y = model(local)
                y = gather_sequence(y, cp_group) if cp_group is not None else y
                err = (y - ref).abs().max().item()
                y = model(local, segment_ids=segment_ids)
                y = gather_sequence(y, cp_group) if cp_group is not None else y
                err_packed = (y - ref_packed).abs().max().item()
            out[(family, dtype, layout)] = (err, err_packed, model.embed.split)
    return out


def generation(ctx, tp: int, checkpoints: dict, prompt, max_new_tokens: int) -> dict:
    """`{family: generated tokens}` from `dist_mha.models.generation.generate` at TP=`tp`."""
    from dist_mha.models import from_hf
    from dist_mha.models.generation import generate

    if ctx.rank >= tp:
        return None  # the other TP groups would repeat the first one's work
    group = ctx.group(tp)
    return {family: generate(from_hf(path, tp_group=group), prompt, max_new_tokens)
            for family, path in checkpoints.items()}


def export_round_trip(ctx, tp: int, path: str, out_dir: str) -> dict:
    """from_hf at TP=`tp` -> to_hf (every rank) -> from_hf again: are this rank's weights bitwise equal?"""
    from dist_mha.models import from_hf, to_hf

    group = ctx.group(tp)
    model = from_hf(path, tp_group=group)
    to_hf(model, out_dir)  # collective; rank 0 writes (the pool's groups {0,1}, {2,3} both gather)
    again = from_hf(out_dir, tp_group=group)
    a, b = dict(model.named_parameters()), dict(again.named_parameters())
    return {"same_names": a.keys() == b.keys(), "bitwise": all(torch.equal(a[k], b[k]) for k in a),
            "dtypes": sorted({str(p.dtype) for p in b.values()})}


def bytes_read(ctx, tp: int, path: str) -> dict:
    """Bytes this rank reads from the safetensors files while loading at TP=`tp` (sharded reading)."""
    from dist_mha.models import from_hf
    from dist_mha.models.hf import load

    seen = []
    original = load._Directory.read

    def spy(self, name, index):
        t = original(self, name, index)
        seen.append(t.numel() * t.element_size())
        return t

    load._Directory.read = spy
    try:
        model = from_hf(path, tp_group=ctx.group(tp))
    finally:
        load._Directory.read = original
    return {"read": sum(seen), "kept": sum(p.numel() * p.element_size() for p in model.parameters())}


def load_error(ctx, tp: int, path: str) -> str:
    """The ValueError from_hf raises at TP=`tp` (raised before any collective, so the pool survives)."""
    from dist_mha.models import from_hf

    try:
        from_hf(path, tp_group=ctx.group(tp))
    except ValueError as e:
        return str(e)
    return ""

"""Task bodies for the Hugging Face model tests, run inside the rank pool (see tp_tasks.py)."""

from __future__ import annotations

import torch

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


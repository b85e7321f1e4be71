"""Vocabulary-parallel embedding and output head.

Shape legend: B batch, T sequence (T/tp per rank under sequence parallelism),
E features, V vocabulary (V/tp rows per rank when split).

When the TP size divides V, each rank holds V/tp consecutive rows of the
table (the same rows for a tied head):
- embedding: look up the ids that fall in this rank's rows (zeros for the
  others), then sum over the group (all-reduce; reduce-scatter onto the
  sequence shards under sequence parallelism);
- head: the (replicated) hidden states enter the region, each rank computes
  the logits of its V/tp words, and they are all-gathered on the vocab dim.
Otherwise the table is replicated and no collective runs but the SP
scatter/gather. Both keep every rank's logits full `(B, T, V)`, so any loss
code works unchanged; the split saves `(1 - 1/tp)` of the table on each rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_mha.parallel import mesh
from dist_mha.parallel.agreement import agreed_random_base
from dist_mha.parallel.collectives import (
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)
from dist_mha.parallel.groups import rank_of, size_of
from dist_mha.parallel.tp import placement, reshard
from dist_mha.parallel.tp.grads import mark_sharded
from dist_mha.rng import counter


class _VocabTable(nn.Module):
    """A `(V, E)` table split on rows over the TP group when the group divides V, else replicated."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group=None, sequence_parallel=False,
                 init_base=None, salt=0, split=None, initialize=True, cp_group=None, device=None, dtype=None):
        super().__init__()
        tp_group, tp_mesh, _, cp_mesh = mesh.axes(tp_group, cp_group)
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = size_of(tp_group), rank_of(tp_group)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        divides = num_embeddings % self.tp_size == 0
        if split and not divides:
            raise ValueError(f"Received split=True for a vocabulary of {num_embeddings} rows over {self.tp_size} TP "
                             "ranks, which does not divide it; pass split=None (replicate then) or pad the vocabulary.")
        self.split = divides if split is None else bool(split)
        rows = num_embeddings // self.tp_size if self.split else num_embeddings
        self.row_start = self.tp_rank * rows if self.split else 0
        dtype = dtype or torch.get_default_dtype()
        if not initialize:  # the caller fills it (a checkpoint)
            self.weight = nn.Parameter(torch.zeros(rows, embedding_dim, device=device, dtype=dtype))
        else:  # N(0, 0.02) keyed by global row, so the table does not depend on the TP degree
            base = agreed_random_base(tp_group) if init_base is None else init_base
            index = (slice(self.row_start, self.row_start + rows),)
            init = counter.normal(counter.mix64(base, salt), (num_embeddings, embedding_dim), index, device=device)
            self.weight = nn.Parameter((init * 0.02).to(dtype))
        if self.split and self.tp_size > 1:
            mark_sharded(self.weight)
        # Split rows: each rank's gradient is exactly that of its rows (the lookup's and the logits'
        # collectives route every row's gradient to its owner). Replicated: every rank computes the
        # whole gradient (full ids, full logits), so it is equal on every rank, not partial.
        placement.declare(self, "weight", placement.shard(0, num_embeddings) if self.split else placement.replicate())
        if tp_mesh is not None or cp_mesh is not None:
            from dist_mha.parallel.dtensor import distribute

            distribute(self, tp_mesh, cp_mesh)

    def get_extra_state(self):
        if not self.split:
            return {"replicated": True}  # not a sharded layer: checkpoints copy it as is
        return reshard.extra_state(self, {"weight": 0}, self.num_embeddings, "vocabulary rows")

    def set_extra_state(self, state):
        reshard.check_extra_state(self, state, type(self).__name__)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"{'rows ' + str(self.row_start) + '..' + str(self.row_start + self.weight.shape[0]) if self.split and self.tp_size > 1 else 'replicated'}")


class VocabParallelEmbedding(_VocabTable):
    """Token ids -> embeddings, the table's rows split over the TP group (see the module docstring).

    Args:
        num_embeddings: V.
        embedding_dim: E.
        tp_group: process group, a 1-D DeviceMesh (the table becomes a DTensor,
            `Shard(0)` when split, else `Replicate`), or None.
        sequence_parallel: return this rank's sequence shard `(B, T/tp, E)`.
        init_base, salt: seed of the initial N(0, 0.02) table (None: agreed over the TP group).
        split: None splits the rows when the TP size divides V and replicates them
            otherwise; False always replicates (bench/bench_hf_vocab.py compares both).
        initialize: False leaves the table zero, for a caller that fills it.
        cp_group: with a mesh, the CP axis (the table is replicated over it, gradients averaged).
        device, dtype: of the table.

    Call arguments:
        ids: int64 `(B, T)`, every id in `[0, V)`.

    Returns:
        `(B, T, E)` (or `(B, T/tp, E)` under sequence parallelism).

    Example:

    >>> VocabParallelEmbedding(100, 16)(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 16])
    """

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        if not self.split:
            x = F.embedding(ids, self.weight)
            return scatter_to_tp(self.tp_group, x, 1) if self.sequence_parallel else x
        local = ids - self.row_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(torch.where(mine, local, torch.zeros_like(local)), self.weight)
        x = x * mine[..., None].to(x.dtype)  # other ranks' words contribute zeros to the sum
        if self.sequence_parallel:
            return reduce_scatter_to_sp(self.tp_group, x, 1)
        return reduce_from_tp(self.tp_group, x, inplace=True)


def vocab_logits(table: _VocabTable, x: torch.Tensor) -> torch.Tensor:
    """Logits `(B, T, V)` of hidden states `x` against `table`'s rows (a tied or an untied head).

    With DTensor tables call it inside a forward of the table or of a module
    holding it (their hooks put the local table in place).

    Args:
        table: a `VocabParallelEmbedding` (tied head) or `VocabParallelHead`.
        x: `(B, T, E)` replicated over TP, or `(B, T/tp, E)` under sequence parallelism.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(table.weight, DTensor):
        raise ValueError(
            f"Received a {type(table).__name__} whose weight is a DTensor (built on a DeviceMesh) outside a forward: "
            "vocab_logits computes on the local table, which the forward hooks of the table (or of the model "
            "holding it) put in place. Call the head itself (head(x)), or call vocab_logits inside a forward of a "
            "module that holds the table.")
    group = table.tp_group
    if table.tp_size == 1:
        return F.linear(x, table.weight)
    if not table.split:
        x = gather_from_tp(group, x, 1) if table.sequence_parallel else x
        return F.linear(x, table.weight)
    # Each rank's words read all of x: its gradient is partial per rank and summed on the way back.
    x = gather_from_sp(group, x, 1) if table.sequence_parallel else copy_to_tp(group, x)
    return gather_from_tp(group, F.linear(x, table.weight), x.dim() - 1)


class VocabParallelHead(_VocabTable):
    """An untied output head `(V, E)`, rows split over the TP group like `VocabParallelEmbedding`.

    Call arguments:
        x: `(B, T, E)` (or `(B, T/tp, E)` under sequence parallelism).

    Returns:
        Logits `(B, T, V)`, full on every rank.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vocab_logits(self, x)

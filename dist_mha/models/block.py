"""A pre-norm transformer block built on dist_mha, tensor-parallel end to end.

Shape legend: B batch, T sequence (T/tp per rank under sequence parallelism), E embed dim.

    x -> LayerNorm -> MultiHeadAttention (heads split) -> dropout -> + x
      -> LayerNorm -> ColumnParallelLinear -> GELU -> RowParallelLinear -> dropout -> +

Per layer call: one all-reduce forward and one backward in each of the two
sublayers (none in between: the MLP's hidden activations stay sharded).
Residual dropout acts on tensors every TP rank holds in full, so it draws
from the attention layer's replicated stream (equal masks on all TP ranks);
under sequence parallelism each rank holds different rows and draws from a
per-rank stream instead (so does each rank of a context-parallel group).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from dist_mha.layers.group_query_attention import GroupQueryAttention
from dist_mha.layers.multi_head_attention import MultiHeadAttention
from dist_mha.parallel import mesh
from dist_mha.parallel.agreement import agreed_random_base
from dist_mha.parallel.groups import rank_of, size_of
from dist_mha.parallel.tp.linear import (
    ColumnParallelLinear,
    ParallelLayerNorm,
    RowParallelLinear,
)
from dist_mha.rng.streams import RNGStream, dropout, stream_seed


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP block.

    Args:
        embed_dim: E.
        num_heads: attention (query) heads (divisible by the TP size).
        num_kv_heads: key/value heads for grouped-query attention (None or
            `num_heads`: multi-head attention; 1: multi-query); divides
            `num_heads`, and splits across TP ranks or is replicated on them.
        mlp_ratio: MLP hidden size as a multiple of E.
        dropout: residual dropout rate.
        attention_dropout: dropout on attention probabilities.
        causal: apply a causal mask (decoder block).
        attention: optional module replacing the default `MultiHeadAttention`;
            it is called as `attention(h, h, value_mask=..., use_causal_mask=...)`.
        tp_group, sequence_parallel: tensor parallelism, as in `MultiHeadAttention` (a
            process group, or a 1-D DeviceMesh for DTensor parameters).
        cp_group, cp_mode: context parallelism, as in `MultiHeadAttention`: `x`
            is this rank's part of the sequence (`shard_sequence`), the
            padding mask stays global.
        seed: seeds dropout streams (None: drawn from torch's global RNG).
        dropout_mode: attention dropout mode ("per_rank" or "tp_invariant").
        device, dtype: of the parameters.

    Call arguments:
        x: `(B, T, E)` (or `(B, T/tp, E)` under sequence parallelism).
        padding_mask: optional bool `(B, T)`, True for real tokens (always full length).
        cache: optional `KVCache` of the attention layer (`block.attention.init_cache`)
            for incremental decoding.
        segment_ids: optional int `(B, T)` document ids of packed sequences
            (global under sequence/context parallelism; negative: padding).

    Returns:
        A tensor shaped like `x`.

    Example:

    >>> block = TransformerBlock(64, 4)
    >>> block(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 64])
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, mlp_ratio=4, dropout=0.0, attention_dropout=0.0,
                 causal=True, attention=None, tp_group=None, sequence_parallel=False, cp_group=None,
                 cp_mode="ring", seed=None, dropout_mode="per_rank", device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"Received embed_dim={embed_dim} not divisible by num_heads={num_heads}.")
        self.causal = causal
        self.dropout = dropout
        # Sublayers take the arguments as given (meshes make DTensor parameters); collectives use the groups.
        tp_arg, cp_arg = tp_group, cp_group
        tp_group, tp_mesh, cp_group, cp_mesh = mesh.axes(tp_arg, cp_arg)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and size_of(tp_group) > 1
        # Weights and dropout seeds must be equal on every TP and CP rank of a model replica,
        # even when the ranks were seeded differently: both come from the first rank's draw.
        seed = agreed_random_base(tp_group, cp_group) if seed is None else seed
        ln = dict(tp_group=tp_arg, sequence_parallel=sequence_parallel, device=device, dtype=dtype, cp_group=cp_arg)
        self.norm1 = ParallelLayerNorm(embed_dim, **ln)
        common = dict(dropout=attention_dropout, seed=seed, query_shape=embed_dim, tp_group=tp_arg,
                      sequence_parallel=sequence_parallel, dropout_mode=dropout_mode, device=device, dtype=dtype)
        if cp_group is not None:
            common.update(cp_group=cp_arg, cp_mode=cp_mode)
        if attention is not None:
            self.attention = attention
        elif num_kv_heads is None or num_kv_heads == num_heads:
            self.attention = MultiHeadAttention(num_heads, embed_dim // num_heads, **common)
        else:
            self.attention = GroupQueryAttention(embed_dim // num_heads, num_heads, num_kv_heads, **common)
        self.norm2 = ParallelLayerNorm(embed_dim, **ln)
        hidden = mlp_ratio * embed_dim
        lin = dict(tp_group=tp_arg, sequence_parallel=sequence_parallel, device=device, dtype=dtype, cp_group=cp_arg)
        init_base = agreed_random_base(tp_group, cp_group)
        self.fc1 = ColumnParallelLinear(embed_dim, hidden, salt=1, init_base=init_base, **lin)
        self.fc2 = RowParallelLinear(hidden, embed_dim, salt=2, init_base=init_base, **lin)
        # Residual dropout acts on rows this rank holds: replicated across TP, unless SP
        # or CP gives each rank other rows, which then need their own masks.
        cp = size_of(cp_group)
        rank = (rank_of(tp_group) if self.sequence_parallel else 0) + size_of(tp_group) * rank_of(cp_group)
        self.residual_stream = RNGStream(
            stream_seed(seed, "residual", rank if (self.sequence_parallel or cp > 1) else None), "residual"
        )
        if tp_mesh is not None or cp_mesh is not None:
            from dist_mha.parallel.dtensor import distribute

            distribute(self, tp_mesh, cp_mesh)  # one hook per block: the forward swaps in every local view once

    def rng_streams(self):
        return [self.residual_stream]

    def get_extra_state(self):
        # The residual-dropout stream's position, so a resumed run draws the same masks.
        return {"rng": {"residual": self.residual_stream.state_dict()}}

    def set_extra_state(self, state):
        if isinstance(state, dict) and "residual" in state.get("rng", {}):
            self.residual_stream.load_state_dict(state["rng"]["residual"])

    def _drop(self, x):
        if not (self.training and self.dropout > 0):
            return x
        return dropout(x, self.dropout, self.residual_stream)

    def forward(self, x, padding_mask=None, cache=None, segment_ids=None):
        h = self.norm1(x)
        extra = {} if cache is None else {"cache": cache}
        if segment_ids is not None:
            extra["segment_ids"] = segment_ids
        x = x + self._drop(self.attention(h, h, value_mask=padding_mask, use_causal_mask=self.causal, **extra))
        h = self.norm2(x)
        return x + self._drop(self.fc2(F.gelu(self.fc1(h))))

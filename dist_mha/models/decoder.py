"""A small decoder-only language model made of `TransformerBlock`s.

Shape legend: B batch, T sequence, E embed dim, V vocabulary.

Embeddings, final norm and the (tied) output head are replicated on every
TP rank; the blocks are tensor-parallel. Under sequence parallelism the
embedded sequence is split on T after the embedding and gathered before the
head. Incremental decoding (a KV cache per block) is in `generation.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_mha.attention.segments import document_positions
from dist_mha.models.block import TransformerBlock
from dist_mha.parallel import mesh
from dist_mha.parallel.agreement import agreed_random_base
from dist_mha.parallel.collectives import gather_from_tp, scatter_to_tp
from dist_mha.parallel.cp.layout import positions
from dist_mha.parallel.groups import size_of
from dist_mha.parallel.tp import placement
from dist_mha.parallel.tp.linear import ParallelLayerNorm
from dist_mha.rng import counter


class DecoderLM(nn.Module):
    """Token + position embedding -> blocks -> LayerNorm -> tied head.

    Args:
        vocab_size: V.
        max_len: longest sequence.
        embed_dim, num_heads, num_layers, mlp_ratio: the shape of the model.
        num_kv_heads: key/value heads of grouped-query attention (None: as
            many as `num_heads`; 1: multi-query attention).
        dropout: residual and embedding dropout; attention_dropout: on attention probabilities.
        tp_group, sequence_parallel, dropout_mode: tensor parallelism (see `MultiHeadAttention`);
            with 1-D DeviceMeshes for `tp_group`/`cp_group` every parameter is a DTensor.
        cp_group, cp_mode: context parallelism: `tokens` is this rank's part
            of the sequence (`shard_sequence`), positions are global, and the
            logits are this rank's part too.
        seed: seeds dropout streams (None: drawn from torch's global RNG).
        device, dtype: of the parameters.

    Call arguments:
        tokens: int64 `(B, T)`; `T` divisible by the TP size under sequence parallelism.
        cache: optional `DecoderCache` from `init_cache`: the tokens continue
            the cached sequence (positions start at `cache.length`), and their
            keys and values are appended to it.
        segment_ids: optional int `(B, T)` document ids of packed rows (full
            length, global under CP): attention stays within a document and
            position ids restart at each document's first token.

    Returns:
        Logits `(B, T, V)`.
    """

    def __init__(self, vocab_size, max_len, embed_dim=64, num_heads=4, num_layers=2, mlp_ratio=4, dropout=0.0,
                 attention_dropout=0.0, *, num_kv_heads=None, tp_group=None, sequence_parallel=False,
                 cp_group=None, cp_mode="ring", dropout_mode="per_rank", seed=None, device=None, dtype=None):
        super().__init__()
        # Blocks and the norm take the arguments as given (meshes make DTensor parameters).
        tp_arg, cp_arg = tp_group, cp_group
        tp_group, tp_mesh, cp_group, cp_mesh = mesh.axes(tp_arg, cp_arg)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and size_of(tp_group) > 1
        self.max_len = max_len
        self.cp_group = cp_group
        # Equal on every TP and CP rank of a replica, whatever each rank's own seed.
        base = agreed_random_base(tp_group, cp_group)
        self.tok = nn.Embedding(vocab_size, embed_dim, device=device, dtype=dtype)
        self.pos = nn.Embedding(max_len, embed_dim, device=device, dtype=dtype)
        with torch.no_grad():
            for salt, emb in ((1, self.tok), (2, self.pos)):  # N(0, 0.02), by global index
                emb.weight.copy_(counter.normal(counter.mix64(base, salt), emb.weight.shape, device=device) * 0.02)
                placement.declare(emb, "weight", placement.replicate())  # grads equal on every TP rank (full logits)
        seed = base if seed is None else seed
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, num_kv_heads=num_kv_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                             attention_dropout=attention_dropout, tp_group=tp_arg,
                             sequence_parallel=sequence_parallel, cp_group=cp_arg, cp_mode=cp_mode,
                             seed=seed + 1000 * (i + 1),
                             dropout_mode=dropout_mode, device=device, dtype=dtype)
            for i in range(num_layers)
        )
        self.norm = ParallelLayerNorm(embed_dim, tp_group=tp_arg, sequence_parallel=sequence_parallel,
                                      cp_group=cp_arg, device=device, dtype=dtype)
        if tp_mesh is not None or cp_mesh is not None:
            from dist_mha.parallel.dtensor import distribute

            distribute(self, tp_mesh, cp_mesh)

    def init_cache(self, batch_size: int, max_length: int | None = None):
        """An empty `DecoderCache` (one KV cache per block, this rank's key/value heads)."""
        from dist_mha.models.generation import DecoderCache

        return DecoderCache(self, batch_size, self.max_len if max_length is None else max_length)

    def _positions(self, tokens, cache, segment_ids):
        """Position ids `(1 | B, t)` of this rank's tokens; each packed document starts at 0."""
        T = tokens.shape[1] * size_of(self.cp_group)  # the global length
        start = 0 if cache is None else cache.length
        if cache is not None and size_of(self.cp_group) > 1:
            raise ValueError("KV-cache decoding runs without context parallelism; build the model without cp_group.")
        pos = start + positions(T, self.cp_group, tokens.device)[None]  # this rank's global positions
        longest = start + T
        if segment_ids is not None:
            within = document_positions(torch.as_tensor(segment_ids, device=tokens.device))
            pos = within.gather(1, pos.expand(within.shape[0], -1))
            if longest > self.max_len:  # a long packed row fits when each document does (one host read)
                longest = int(within.max()) + 1
        if longest > self.max_len:
            raise ValueError(
                f"Received {T} tokens at position {start}"
                + (" whose longest document needs position ids up to " + str(longest - 1) if segment_ids is not None else "")
                + f": the model has position embeddings for max_len={self.max_len} positions. Shorten the sequence "
                "(or the generation, or the documents)."
            )
        return pos

    def forward(self, tokens, cache=None, segment_ids=None):
        x = self.tok(tokens) + self.pos(self._positions(tokens, cache, segment_ids))
        if self.sequence_parallel:
            if cache is not None:
                raise ValueError("KV-cache decoding runs without sequence parallelism; build the model with "
                                 "sequence_parallel=False for generation (the weights are the same).")
            x = scatter_to_tp(self.tp_group, x, 1)  # (B, T/tp, E)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if cache is None else cache.layers[i], segment_ids=segment_ids)
        x = self.norm(x)
        if self.sequence_parallel:
            x = gather_from_tp(self.tp_group, x, 1)  # (B, T, E)
        return F.linear(x, self.tok.weight)

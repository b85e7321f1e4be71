"""A decoder-only language model in the shape of the Llama, Mistral, Qwen and Gemma2 families.

Shape legend: B batch, T sequence (this rank's part under context
parallelism; T/tp after the embedding under sequence parallelism), E embed
dim, V vocabulary.

    tokens -> embedding (vocab-parallel) [* embed_scale] -> DecoderLayer x L
           -> RMSNorm -> head (vocab-parallel, or the tied embedding) [-> logit softcap] -> logits

`DecoderLM`'s sibling: the same attention layers, TP/SP/CP layouts and KV
cache (`init_cache`, `dist_mha.models.generation.generate` work on both), with
what these families need instead of DecoderLM's learned positions and
LayerNorm/GELU: rotary positions inside the attention layers, RMSNorm, gated
MLPs, untied heads and per-layer sliding windows. `dist_mha.models.from_hf`
builds one from a Hugging Face checkpoint.

On 1-D DeviceMesh axes (`tp_group=state.mesh["tp"]`) every parameter is a
DTensor (`dist_mha.parallel.dtensor`), each declared where its part creates
it; each `DecoderLayer` and the root get their own forward hook, so FSDP2
can shard `model.blocks[i]` and the root apart (`dist_mha.train.fsdp.shard`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from dist_mha.layers.group_query_attention import GroupQueryAttention
from dist_mha.models.decoder_layer import DecoderLayer
from dist_mha.models.mlp import GatedMLP
from dist_mha.models.norms import RMSNorm
from dist_mha.parallel import mesh
from dist_mha.parallel.agreement import agreed_random_base
from dist_mha.parallel.groups import size_of
from dist_mha.parallel.tp.vocab import VocabParallelEmbedding, VocabParallelHead, vocab_logits
from dist_mha.rng import counter


@dataclass
class CausalLMConfig:
    """The architecture of a `CausalLM` (what `dist_mha.models.hf` reads off a Hugging Face config).

    Attributes:
        vocab_size, hidden_size, intermediate_size, num_layers: V, E, the MLP width, L.
        num_heads, num_kv_heads, head_dim: query heads, key/value heads, head size.
        norm_eps: RMSNorm epsilon (also of the q/k norms).
        norm_unit_offset: Gemma's `(1 + w)` RMSNorm.
        sandwich_norms: Gemma2's extra norms after attention and after the MLP.
        activation: MLP activation (`GatedMLP.ACTIVATIONS`).
        attention_bias, output_bias, mlp_bias: biases of q/k/v, of the attention
            output projection, of the MLP projections.
        tie_embeddings: the head is the embedding table.
        embed_scale: multiplies the embeddings (Gemma: sqrt(E) rounded to float32), or None.
        rope: the attention layers' `rope` dict (Hugging Face `rope_parameters`).
        qk_norm: RMSNorm of each query and key head before RoPE (Qwen3).
        windows: per-layer sliding window (None: full attention).
        attn_softcap, final_softcap: `tanh(x / c) * c` on attention logits / output logits.
        scale: attention logit scale (None: `head_dim ** -0.5`).
        attention_dropout: dropout on attention probabilities.
        max_positions: the longest sequence a KV cache is made for.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    activation: str = "silu"
    attention_bias: bool = False
    output_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    embed_scale: float | None = None
    rope: dict | None = None
    qk_norm: bool = False
    windows: tuple = ()
    attn_softcap: float | None = None
    final_softcap: float | None = None
    scale: float | None = None
    attention_dropout: float = 0.0
    max_positions: int = 2048

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CausalLM(nn.Module):
    """Embedding -> `DecoderLayer`s -> RMSNorm -> head, tensor/sequence/context parallel.

    Args:
        config: a `CausalLMConfig`.
        tp_group, sequence_parallel: tensor (and sequence) parallelism: a process
            group, or a 1-D DeviceMesh (`state.mesh["tp"]`) for DTensor parameters.
        cp_group, cp_mode: context parallelism ("ring" or "ulysses"): `tokens`
            is this rank's part of each row (`shard_sequence`), and so are the logits;
            `cp_group` is a mesh axis too when `tp_group` is (`state.mesh["cp"]`).
        seed: seeds dropout streams (None: agreed from torch's global RNG).
        device, dtype: of the parameters.
        initialize: draw initial weights (False: zeros for the projections, MLPs and
            tables, for a caller that overwrites every weight, as `from_hf` does).

    Call arguments:
        tokens: int64 `(B, T)`.
        segment_ids: optional int `(B, T)` document ids of packed rows (full length,
            global under CP): attention stays within a document, positions restart.
        position_ids: optional int `(B, T)` rotary positions (full length, global
            under CP); default 0.., restarting per document, continuing a cache.
        cache: optional `DecoderCache` from `init_cache`.

    Returns:
        Logits `(B, T, V)`, full over the vocabulary on every TP rank.

    Raises:
        ValueError: for a cache under sequence or context parallelism.

    Example:

    >>> cfg = CausalLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    ...                      num_heads=4, num_kv_heads=2, head_dim=8, rope={"rope_type": "default"})
    >>> CausalLM(cfg)(torch.randint(0, 64, (2, 10))).shape
    torch.Size([2, 10, 64])
    """

    def __init__(self, config: CausalLMConfig, *, tp_group=None, sequence_parallel=False, cp_group=None,
                 cp_mode="ring", seed=None, device=None, dtype=None, initialize=True):
        super().__init__()
        c = self.config = config
        self._initialize = initialize
        # The parts take the arguments as given (meshes make DTensor parameters); collectives use the groups.
        tp_arg, cp_arg = tp_group, cp_group
        tp_group, self._tp_mesh, cp_group, self._cp_mesh = mesh.axes(tp_arg, cp_arg)
        self.tp_group, self.cp_group = tp_group, cp_group
        self.sequence_parallel = sequence_parallel and size_of(tp_group) > 1
        self.max_len = c.max_positions  # DecoderCache's bound
        base = agreed_random_base(tp_group, cp_group)
        seed = base if seed is None else seed
        par = dict(tp_group=tp_arg, sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        parts = dict(par, cp_group=cp_arg)  # norms, MLPs and tables: a CP mesh axis replicates their weights
        tables = dict(init_base=base, initialize=initialize, **parts)
        self.embed = VocabParallelEmbedding(c.vocab_size, c.hidden_size, salt=1, **tables)
        windows = tuple(c.windows) or (None,) * c.num_layers
        self.blocks = nn.ModuleList(self._layer(i, windows[i], seed, base, par, parts, cp_arg, cp_mode)
                                    for i in range(c.num_layers))
        self.norm = self._norm(parts)
        self.head = None if c.tie_embeddings else VocabParallelHead(c.vocab_size, c.hidden_size, salt=2, **tables)
        self._distribute(self)  # the root's hook swaps the tables and the final norm (and all, without FSDP)

    def _distribute(self, module):
        """`dtensor.distribute` on mesh axes (a hook per module: FSDP2 shards each block and the root apart)."""
        if self._tp_mesh is not None or self._cp_mesh is not None:
            from dist_mha.parallel.dtensor import distribute

            distribute(module, self._tp_mesh, self._cp_mesh)
        return module

    def _norm(self, parts):
        return RMSNorm(self.config.hidden_size, self.config.norm_eps, unit_offset=self.config.norm_unit_offset,
                       **parts)

    def _layer(self, i, window, seed, base, par, parts, cp_group, cp_mode):
        c = self.config
        extras = {k: v for k, v in (("rope", c.rope), ("qk_norm", "rms" if c.qk_norm else None),
                                    ("logit_softcap", c.attn_softcap), ("scale", c.scale)) if v is not None}
        if c.qk_norm:
            extras["qk_norm_eps"] = c.norm_eps
        if c.output_bias != c.attention_bias:
            extras["output_bias"] = c.output_bias
        if cp_group is not None:
            extras.update(cp_group=cp_group, cp_mode=cp_mode)
        if not self._initialize:
            extras.update(kernel_initializer="zeros", bias_initializer="zeros")
        attention = GroupQueryAttention(c.head_dim, c.num_heads, c.num_kv_heads, dropout=c.attention_dropout,
                                        use_bias=c.attention_bias, sliding_window=window, seed=seed + 1000 * (i + 1),
                                        query_shape=c.hidden_size, **par, **extras)
        mlp = GatedMLP(c.hidden_size, c.intermediate_size, activation=c.activation, bias=c.mlp_bias,
                       init_base=counter.mix64(base, 100 + i), initialize=self._initialize, **parts)
        sandwich = dict(attn_out_norm=self._norm(parts), mlp_out_norm=self._norm(parts)) if c.sandwich_norms else {}
        layer = DecoderLayer(attention, mlp, attn_norm=self._norm(parts), mlp_norm=self._norm(parts), **sandwich)
        return self._distribute(layer)

    def init_cache(self, batch_size: int, max_length: int | None = None):
        """An empty `DecoderCache` (one KV cache per layer, this rank's key/value heads)."""
        from dist_mha.models.generation import DecoderCache

        return DecoderCache(self, batch_size, self.max_len if max_length is None else max_length)

    def forward(self, tokens, *, segment_ids=None, position_ids=None, cache=None):
        if cache is not None and (self.sequence_parallel or size_of(self.cp_group) > 1):
            raise ValueError("KV-cache decoding runs without sequence or context parallelism; build the model "
                             "with sequence_parallel=False and cp_group=None for generation (the weights are the same).")
        x = self.embed(tokens)  # (B, T, E), or (B, T/tp, E) under SP
        if self.config.embed_scale is not None:
            # Gemma: sqrt(E) rounded to the model dtype (as from_pretrained builds it).
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        for i, layer in enumerate(self.blocks):
            x = layer(x, segment_ids=segment_ids, position_ids=position_ids,
                      cache=None if cache is None else cache.layers[i])
        x = self.norm(x)
        logits = vocab_logits(self.embed if self.head is None else self.head, x)  # (B, T, V)
        if self.config.final_softcap is not None:
            cap = self.config.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

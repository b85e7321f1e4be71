"""Which Hugging Face tensor is which `CausalLM` parameter, and how a TP rank's slice of it is cut.

Shape legend: D hidden size, U heads of a projection (N query, K key/value),
n/u this rank's heads, hd head size, I intermediate size, V vocabulary.

| kind | HF tensor | ours (this rank) | this rank reads |
|---|---|---|---|
| heads_in | `q/k/v_proj.weight (U*hd, D)` | `kernel (D, u, hd)` | rows of its heads |
| heads_bias | `q/k/v_proj.bias (U*hd,)` | `bias (u, hd)` | entries of its heads |
| heads_out | `o_proj.weight (D, N*hd)` | `kernel (n, hd, D)` | columns of its heads |
| rows | `gate/up_proj (I, D)`, `embed_tokens`/`lm_head (V, D)` | `(I/tp | V/tp, D)` | its rows (all when replicated) |
| cols | `down_proj.weight (D, I)` | `(D, I/tp)` | its columns |
| full | norms, `o_proj.bias`, `down_proj.bias` | the same | everything |

A rank's heads are `sharding.head_range` (key/value heads fewer than TP
ranks: the one its query heads read, replicated). Export runs the table
backwards on tensors gathered over the TP group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_mha.models.causal_lm import CausalLMConfig
from dist_mha.parallel.collectives import gather_from_tp
from dist_mha.parallel.groups import rank_of, size_of
from dist_mha.parallel.tp import sharding

# Tensors some checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Rule:
    """HF tensor `hf` is our parameter `ours`; `kind` says how (table above); `units` heads or split rows."""

    hf: str
    ours: str
    kind: str
    units: int = 0


def rules(cfg: CausalLMConfig) -> list[Rule]:
    """Every tensor of a checkpoint of this architecture, in HF's order."""
    N, K = cfg.num_heads, cfg.num_kv_heads
    out = [Rule("model.embed_tokens.weight", "embed.weight", "rows", cfg.vocab_size)]
    for i in range(cfg.num_layers):
        h, o = f"model.layers.{i}.", f"blocks.{i}."
        a, ao = h + "self_attn.", o + "attention."
        for proj, ours, units in (("q_proj", "query", N), ("k_proj", "key", K), ("v_proj", "value", K)):
            out.append(Rule(f"{a}{proj}.weight", f"{ao}{ours}.kernel", "heads_in", units))
            if cfg.attention_bias:
                out.append(Rule(f"{a}{proj}.bias", f"{ao}{ours}.bias", "heads_bias", units))
        out.append(Rule(a + "o_proj.weight", ao + "attention_output.kernel", "heads_out", N))
        if cfg.output_bias:
            out.append(Rule(a + "o_proj.bias", ao + "attention_output.bias", "full"))
        if cfg.qk_norm:
            out += [Rule(a + "q_norm.weight", ao + "query_norm.weight", "full"),
                    Rule(a + "k_norm.weight", ao + "key_norm.weight", "full")]
        out.append(Rule(h + "input_layernorm.weight", o + "attn_norm.weight", "full"))
        if cfg.sandwich_norms:
            out += [Rule(h + "post_attention_layernorm.weight", o + "attn_out_norm.weight", "full"),
                    Rule(h + "pre_feedforward_layernorm.weight", o + "mlp_norm.weight", "full"),
                    Rule(h + "post_feedforward_layernorm.weight", o + "mlp_out_norm.weight", "full")]
        else:
            out.append(Rule(h + "post_attention_layernorm.weight", o + "mlp_norm.weight", "full"))
        I = cfg.intermediate_size
        for proj, ours in (("gate_proj", "gate"), ("up_proj", "up")):
            out.append(Rule(f"{h}mlp.{proj}.weight", f"{o}mlp.{ours}.weight", "rows", I))
            if cfg.mlp_bias:
                out.append(Rule(f"{h}mlp.{proj}.bias", f"{o}mlp.{ours}.bias", "rows", I))
        out.append(Rule(h + "mlp.down_proj.weight", o + "mlp.down.weight", "cols", I))
        if cfg.mlp_bias:
            out.append(Rule(h + "mlp.down_proj.bias", o + "mlp.down.bias", "full"))
    out.append(Rule("model.norm.weight", "norm.weight", "full"))
    if not cfg.tie_embeddings:
        out.append(Rule("lm_head.weight", "head.weight", "rows", cfg.vocab_size))
    return out


def global_shape(rule: Rule, local: torch.Size, head_dim: int, group) -> tuple:
    """The shape the HF tensor must have, given our local parameter's shape."""
    if rule.kind == "heads_in":
        return (rule.units * head_dim, local[0])
    if rule.kind == "heads_bias":
        return (rule.units * head_dim,)
    if rule.kind == "heads_out":
        return (local[2], rule.units * head_dim)
    if rule.kind == "rows":
        return (rule.units, *local[1:])
    if rule.kind == "cols":
        return (local[0], rule.units)
    return tuple(local)


def local_index(rule: Rule, local: torch.Size, head_dim: int, group) -> tuple:
    """The slices of the HF tensor this rank reads (`safe_open(...).get_slice(name)[index]`)."""
    if rule.kind in ("heads_in", "heads_bias", "heads_out"):
        h0, h1 = sharding.head_range(rule.units, group)
        cut = slice(h0 * head_dim, h1 * head_dim)
        return (slice(None), cut) if rule.kind == "heads_out" else (cut,)
    dim = {"rows": 0, "cols": 1}.get(rule.kind)
    if dim is None or local[dim] == rule.units:  # replicated
        return (slice(None),)
    r, n = rank_of(group), local[dim]
    return (slice(None),) * dim + (slice(r * n, (r + 1) * n),)


def hf_view(rule: Rule, p: torch.Tensor) -> torch.Tensor:
    """Our local parameter viewed in the HF tensor's orientation (a view: writing it fills `p`).

    Its shape is the shape of this rank's slice (`local_index`) of the HF tensor.
    """
    if rule.kind == "heads_in":  # (D, u, hd) -> (u*hd, D)
        return p.view(p.shape[0], -1).T
    if rule.kind == "heads_bias":  # (u, hd) -> (u*hd,)
        return p.view(-1)
    if rule.kind == "heads_out":  # (n, hd, D) -> (D, n*hd)
        return p.view(-1, p.shape[-1]).T
    return p


def narrow_rows(index: tuple, r0: int, r1: int) -> tuple:
    """`index` (from `local_index`) restricted to rows `[r0, r1)` of the slice it selects."""
    first = index[0]
    start = first.start or 0
    return (slice(start + r0, start + r1), *index[1:])


def full_ours(rule: Rule, p: torch.Tensor, group) -> torch.Tensor:
    """Our full (unsharded) parameter from this rank's shard: a collective over the TP group."""
    if size_of(group) == 1 or rule.kind == "full":
        return p
    if rule.kind in ("heads_in", "heads_bias", "heads_out"):
        dim = 1 if rule.kind == "heads_in" else 0
        return sharding.gather_full(p, dim, group, sharding.replicas_of(rule.units, group))
    dim = 0 if rule.kind == "rows" else 1
    return p if p.shape[dim] == rule.units else gather_from_tp(group, p, dim)


def to_hf_layout(rule: Rule, full: torch.Tensor) -> torch.Tensor:
    """Our full parameter -> the HF tensor (contiguous, as safetensors requires)."""
    if rule.kind == "heads_in":
        return full.reshape(full.shape[0], -1).T.contiguous()
    if rule.kind == "heads_bias":
        return full.reshape(-1).contiguous()
    if rule.kind == "heads_out":
        return full.reshape(-1, full.shape[-1]).T.contiguous()
    return full.contiguous()

"""Hugging Face attention modules built locally (random weights, no download) and our layer with their weights.

Used by test_llm_features.py as the reference for rotary positions, QK-norm,
soft-capping, the score scale and attention sinks.
"""

from __future__ import annotations

import copy

import torch

from dist_mha import GroupQueryAttention

D, N, K, H = 32, 4, 2, 8  # hidden, query heads, key/value heads, head size


def hf_config(family: str, **extra):
    import transformers

    base = dict(vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=N,
                num_key_value_heads=K, head_dim=H, max_position_embeddings=64)
    if family == "llama":
        return transformers.LlamaConfig(**base, attention_bias=True, **extra)
    if family == "qwen3":
        return transformers.Qwen3Config(**base, attention_bias=True, **extra)
    if family == "gemma2":
        return transformers.Gemma2Config(**base, query_pre_attn_scalar=12, attn_logit_softcapping=3.0,
                                         sliding_window=5, **extra)
    if family == "gpt_oss":
        return transformers.GptOssConfig(**base, num_local_experts=2, num_experts_per_tok=1, sliding_window=5, **extra)
    raise ValueError(family)


def hf_attention(family: str, dtype=torch.float32, seed: int = 0, **extra):
    """`(attention module of layer 0, rotary embedding, config)` of a tiny HF model of `family`."""
    import transformers

    torch.manual_seed(seed)
    cfg = copy.deepcopy(hf_config(family, **extra))
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(dtype)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for name in ("q_norm", "k_norm"):
            if hasattr(attn, name):
                getattr(attn, name).weight.uniform_(0.5, 1.5)  # not the identity
        if hasattr(attn, "sinks"):
            attn.sinks.normal_(0.0, 1.0)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            if proj.bias is not None:
                proj.bias.normal_(0.0, 0.1)
    return attn, model.model.rotary_emb, model.config


def hf_forward(attn, rotary, cfg, x, position_ids, sliding: bool):
    """The module's output for `x (B, T, D)`: causal (and windowed) attention at `position_ids (B, T)`."""
    T = x.shape[1]
    cos, sin = rotary(x, position_ids)
    i = torch.arange(T)[:, None]
    allowed = torch.arange(T)[None] <= i
    if sliding:
        allowed = allowed & (i - torch.arange(T)[None] < cfg.sliding_window)
    mask = torch.zeros(T, T, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)[None, None]
    out, _ = attn(x, (cos, sin), mask.expand(x.shape[0], 1, T, T))
    return out


def ours_like(family: str, attn, cfg, sliding: bool, **kw):
    """Our `GroupQueryAttention` with the module's settings and weights."""
    rope = dict(cfg.rope_parameters)
    if rope.get("rope_type") in ("dynamic", "longrope", "yarn"):
        rope.setdefault("max_position_embeddings", cfg.max_position_embeddings)
    args = dict(rope=rope, use_bias=attn.q_proj.bias is not None, query_shape=D)
    if attn.o_proj.bias is None and attn.q_proj.bias is not None:
        args["output_bias"] = False
    if family == "qwen3":
        args.update(qk_norm="rms", qk_norm_eps=cfg.rms_norm_eps)
    if family == "gemma2":
        args.update(logit_softcap=cfg.attn_logit_softcapping, scale=cfg.query_pre_attn_scalar ** -0.5)
    if family == "gpt_oss":
        args.update(attention_sinks=True)
    if sliding:
        args["sliding_window"] = cfg.sliding_window
    layer = GroupQueryAttention(H, N, K, dtype=attn.q_proj.weight.dtype, **args, **kw)
    layer.set_weights(keras_weights(attn))
    return layer


def keras_weights(attn) -> list:
    """The module's weights in our (Keras's) order and layout."""
    out = []
    for proj, heads in ((attn.q_proj, N), (attn.k_proj, K), (attn.v_proj, K)):
        out.append(proj.weight.detach().t().reshape(D, heads, H))
        if proj.bias is not None:
            out.append(proj.bias.detach().reshape(heads, H))
    out.append(attn.o_proj.weight.detach().t().reshape(N, H, D))
    if attn.o_proj.bias is not None:
        out.append(attn.o_proj.bias.detach())
    for name in ("q_norm", "k_norm"):
        if hasattr(attn, name):
            out.append(getattr(attn, name).weight.detach())
    if hasattr(attn, "sinks"):
        out.append(attn.sinks.detach())
    return [w.float() if w.dtype == torch.bfloat16 else w for w in out]


def hf_grads(attn):
    """The module's weight gradients in `keras_weights` order and layout."""
    return keras_weights(type("G", (), {n: _GradView(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
                                 | {n: _GradView(getattr(attn, n)) for n in ("q_norm", "k_norm") if hasattr(attn, n)}
                                 | ({"sinks": attn.sinks.grad} if hasattr(attn, "sinks") else {}))())


class _GradView:
    def __init__(self, module):
        self.weight = module.weight.grad
        self.bias = None if getattr(module, "bias", None) is None else module.bias.grad

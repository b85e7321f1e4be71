"""Tiny Hugging Face models built locally from configs (no download), one per supported family.

Every family uses 4 query and 2 key/value heads (so TP=4 replicates key/value
heads) and exercises what makes it different: Llama's llama3 rope scaling and
biases, Mistral's sliding window (and a vocabulary 4 does not divide, so the
head is replicated at TP=4), Qwen2's q/k/v-only biases and sliding layers,
Qwen3's QK-norm, explicit head_dim and explicit layer types, Gemma2's softcaps, scalar, sandwich
norms, alternating windows and tied head. Softcaps are set low so they bend
the logits of a random model.
"""

from __future__ import annotations

import copy

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=96)


def config(family: str, **overrides):
    """A tiny `transformers` config of `family` (a fresh object: from_config mutates what it is given)."""
    import transformers as t

    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        cfg = t.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True, rope_parameters=rope)
    elif family == "mistral":
        cfg = t.MistralConfig(**{**COMMON, "vocab_size": 130}, sliding_window=5)
    elif family == "qwen2":
        cfg = t.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    elif family == "qwen3":
        cfg = t.Qwen3Config(**COMMON, head_dim=16, use_sliding_window=True, sliding_window=6,
                            layer_types=["sliding_attention", "full_attention"])
    elif family == "gemma2":
        cfg = t.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                             attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(family: str, dtype=torch.float64, seed: int = 0, attn: str = "eager", **overrides):
    """A random tiny HF model in eval mode. Norm weights are randomised too (HF initialises them to 1 or 0)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config(family, **overrides)), attn_implementation=attn)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def save(model, path, **kwargs) -> str:
    model.save_pretrained(path, **kwargs)
    return str(path)

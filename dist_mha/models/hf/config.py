"""Hugging Face `config.json` -> `CausalLMConfig`, per family, with transformers 5's defaults.

Reads the plain dict (a `config.json`, or `PreTrainedConfig.to_dict()`), so
loading a checkpoint directory does not need `transformers` installed. Every
key is either used, known to be harmless (token ids, init range, bookkeeping),
or refused: a field this model does not implement raises a ValueError that
names it, its value and what is supported, instead of silently computing
something else.
"""

from __future__ import annotations

import math

from dist_mha.models.causal_lm import CausalLMConfig

# transformers 5.24's defaults, per family (tests/test_hf_config.py checks them against the config classes).
_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
              max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
              attention_dropout=0.0, mlp_bias=False)
DEFAULTS = {
    "llama": _LLAMA,
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    sliding_window=4096, attention_dropout=0.0),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None,
                  attention_dropout=0.0, attention_bias=None),  # Qwen2 ignores attention_bias: q/k/v always biased
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None,
                  attention_dropout=0.0),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   hidden_act=None,  # older Gemma2 files carry it too; transformers reads hidden_activation
                   max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                   attention_dropout=0.0, query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, use_bidirectional_attention=None),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM"}
# Read by transformers for tokenisation, generation defaults, init or bookkeeping: no effect on the forward pass.
HARMLESS = {"architectures", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
            "decoder_start_token_id", "initializer_range", "use_cache", "dtype", "torch_dtype", "transformers_version",
            "_name_or_path", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder",
            "output_attentions", "output_hidden_states", "problem_type", "return_dict", "tokenizer_class",
            "model_type", "pretraining_tp", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
            "_attn_implementation_autoset", "task_specific_params", "prefix", "cache_implementation"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def _unsupported(family: str, field: str, value, expected: str, fix: str = "") -> ValueError:
    return ValueError(f"Unsupported config field for model_type={family!r}: {field}={value!r}; expected {expected}."
                      + (f" {fix}" if fix else ""))


def rope_parameters(raw: dict, family: str, max_positions: int) -> dict:
    """transformers 5's `rope_parameters`, from it or from the legacy `rope_theta` / `rope_scaling` keys."""
    rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    rope.setdefault("rope_theta", float(raw.get("rope_theta", 10000.0)))
    if raw.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise _unsupported(family, "rope_parameters.rope_type", kind, f"one of {ROPE_TYPES}",
                           "'dynamic' keeps state across calls in transformers and is not reproduced here.")
    factor = rope.get("partial_rotary_factor")
    if factor not in (None, 1, 1.0):
        raise _unsupported(family, "partial_rotary_factor", factor, "1.0 (full rotation)",
                           f"transformers' {family} code ignores or fails on partial rotation.")
    rope.pop("partial_rotary_factor", None)
    if kind in ("llama3", "yarn", "longrope"):
        rope.setdefault("original_max_position_embeddings", raw.get("original_max_position_embeddings", max_positions))
    return rope


def _windows(family: str, get, layers: int) -> tuple:
    window = get("sliding_window")
    if family == "mistral":
        return (window,) * layers
    if family in ("qwen2", "qwen3"):
        window = window if get("use_sliding_window") else None
        default = ["sliding_attention" if window is not None and i >= get("max_window_layers") else "full_attention"
                   for i in range(layers)]
    else:  # gemma2: even layers slide
        default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    types = get("layer_types") or default
    if len(types) != layers or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise _unsupported(family, "layer_types", types,
                           f"{layers} entries of 'sliding_attention' / 'full_attention'")
    return tuple(window if t == "sliding_attention" else None for t in types)


def parse(raw: dict) -> CausalLMConfig:
    """`CausalLMConfig` of a Hugging Face config dict.

    Args:
        raw: `config.json` as a dict (or `PreTrainedConfig.to_dict()`).

    Returns:
        The architecture, with transformers' defaults for absent keys.

    Raises:
        ValueError: for an unsupported `model_type`, or any field whose value
            this model would not reproduce (named, with what is supported).
    """
    family = raw.get("model_type")
    if family not in DEFAULTS:
        raise ValueError(f"Unsupported model_type={family!r}: dist_mha.models.from_hf loads {sorted(DEFAULTS)}.")
    defaults = DEFAULTS[family]
    known = set(defaults) | HARMLESS
    for key, value in raw.items():
        if key not in known and value not in (None, False, {}, [], 0):
            raise _unsupported(family, key, value, "a field of transformers' " + ARCHITECTURES[family]
                               + " that dist_mha implements", "Remove it if it is inert, or load another model.")

    def get(key):
        value = raw.get(key, defaults.get(key))
        return defaults.get(key) if value is None and key in ("hidden_act", "hidden_activation") else value

    E, N = int(get("hidden_size")), int(get("num_attention_heads"))
    K = int(get("num_key_value_heads") or N)
    layers = int(get("num_hidden_layers"))
    head_dim = int(get("head_dim") or E // N)
    act = get("hidden_activation") if family == "gemma2" else get("hidden_act")
    if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
        raise _unsupported(family, "hidden_activation" if family == "gemma2" else "hidden_act", act,
                           "one of silu, gelu, gelu_pytorch_tanh, relu")
    if family == "gemma2" and get("use_bidirectional_attention"):
        raise _unsupported(family, "use_bidirectional_attention", True, "None or False (causal attention)")
    max_positions = int(get("max_position_embeddings"))
    gemma = family == "gemma2"
    qkv_bias = True if family == "qwen2" else bool(get("attention_bias") or False)
    return CausalLMConfig(
        vocab_size=int(get("vocab_size")), hidden_size=E, intermediate_size=int(get("intermediate_size")),
        num_layers=layers, num_heads=N, num_kv_heads=K, head_dim=head_dim, norm_eps=float(get("rms_norm_eps")),
        norm_unit_offset=gemma, sandwich_norms=gemma, activation=act, attention_bias=qkv_bias,
        output_bias=False if family == "qwen2" else qkv_bias, mlp_bias=bool(get("mlp_bias") or False),
        tie_embeddings=bool(get("tie_word_embeddings")), embed_scale=math.sqrt(E) if gemma else None,
        rope=rope_parameters(raw, family, max_positions), qk_norm=family == "qwen3",
        windows=_windows(family, get, layers),
        attn_softcap=get("attn_logit_softcapping") if gemma else None,
        final_softcap=get("final_logit_softcapping") if gemma else None,
        scale=float(get("query_pre_attn_scalar")) ** -0.5 if gemma else None,
        attention_dropout=float(get("attention_dropout") or 0.0), max_positions=max_positions)

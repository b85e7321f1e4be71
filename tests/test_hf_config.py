"""Hugging Face configs and weight names: what `from_hf` reads, without building a model.

`config.json` is parsed without `transformers`, with transformers 5's
defaults written out per family; these tests hold those defaults and the
per-layer windows against the config classes and models themselves.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="needs transformers (the dev extra)")

import hf_models  # noqa: E402
from dist_mha.models.hf import config as hf_config  # noqa: E402
from dist_mha.models.hf import weights  # noqa: E402


def _sparse(cfg) -> dict:
    """Only what the user set: transformers' `to_diff_dict`, i.e. what a hand-written config.json holds."""
    d = cfg.to_diff_dict()
    d["model_type"] = cfg.model_type
    return d


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_sparse_config_json_parses_like_transformers_full_config(family):
    from transformers import AutoConfig

    cfg = hf_models.config(family)
    full = hf_config.parse(cfg.to_dict())
    assert hf_config.parse(_sparse(cfg)) == full
    # transformers' own defaults for everything we read, through a config it builds from nothing but model_type.
    assert hf_config.parse(AutoConfig.for_model(family).to_dict()) == hf_config.parse({"model_type": family})


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_per_layer_windows_match_the_transformers_modules(family):
    model = hf_models.build(family)
    parsed = hf_config.parse(model.config.to_dict())
    cfg = model.config
    theirs = [cfg.sliding_window if family == "mistral" else getattr(layer.self_attn, "sliding_window", None)
              for layer in model.model.layers]
    assert list(parsed.windows) == theirs
    assert any(w is not None for w in theirs) == (family != "llama")  # the tiny configs slide somewhere
    if family == "qwen2":
        assert theirs[0] is None and theirs[1] == 5  # layers below max_window_layers attend fully


def test_legacy_rope_keys_become_rope_parameters():
    legacy = {"model_type": "llama", "rope_theta": 5e5,
              "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16}}
    rope = hf_config.parse(legacy).rope
    assert rope == {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    assert hf_config.parse({"model_type": "llama", "rope_scaling": None}).rope == {"rope_theta": 10000.0,
                                                                                    "rope_type": "default"}


@pytest.mark.parametrize("raw, named", [
    ({"model_type": "gpt_oss"}, "model_type='gpt_oss'"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ({"model_type": "llama", "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"model_type": "qwen2", "mlp_bias": True}, "mlp_bias=True"),
    ({"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}, "quantization_config="),
    ({"model_type": "llama", "hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    ({"model_type": "gemma2", "use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"model_type": "gemma2", "layer_types": ["full_attention"]}, "layer_types="),
])
def test_unsupported_model_type_or_field_raises_naming_it(raw, named):
    with pytest.raises(ValueError, match="Unsupported") as e:
        hf_config.parse(raw)
    assert named in str(e.value)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_weight_rules_name_exactly_the_tensors_transformers_saves(family, tied, tmp_path):
    from safetensors import safe_open

    model = hf_models.build(family, tie_word_embeddings=tied)
    path = hf_models.save(model, tmp_path)
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        saved = set(f.keys())
    names = [r.hf for r in weights.rules(hf_config.parse(model.config.to_dict()))]
    assert len(names) == len(set(names)) and set(names) == saved

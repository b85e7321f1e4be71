"""`dist_mha.integrations.hf.register()`: unmodified transformers models on dist_mha's kernels.

Each family runs its own attention modules with `attn_implementation="dist_mha"`
and is compared with the same weights on transformers' `"sdpa"` backend (Gemma2,
which refuses sdpa for its softcap, with `"eager"`) in float64: plain causal,
padded (left padding through `attention_mask`), packed (restarting
`position_ids`, `use_cache=False`: HF reads them as documents) and greedy
generation with HF's own KV cache.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (the dev extra)")

import hf_models  # noqa: E402
from dist_mha.integrations import hf  # noqa: E402

# float64 on both sides; the kernels differ (SDPA vs per-document SDPA vs math), so ~1e-15 of rounding remains.
# Gemma2's reference is transformers' eager path, whose softmax runs in float32 even in a float64 model (~1e-8).
TOLS = {"gemma2": 1e-6}
TOL = 1e-12
PACKED_POS = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1, 2, 3, 4, 5],
                           [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5]])


def _pair(family, dtype=torch.float64):
    ref_impl = "eager" if family == "gemma2" else "sdpa"
    ref = hf_models.build(family, dtype=dtype, attn=ref_impl)
    ours = hf_models.build(family, dtype=dtype, attn=ref_impl)
    ours.set_attn_implementation(hf.register())
    return ref, ours


@pytest.fixture(scope="module", params=hf_models.FAMILIES)
def pair(request):
    return request.param, *_pair(request.param)


def test_register_rejects_names_transformers_treats_specially_and_unknown_backends():
    with pytest.raises(ValueError, match="name='my_sdpa'"):
        hf.register("my_sdpa")
    with pytest.raises(ValueError, match="attention_backend='fast'"):
        hf.register("mine", attention_backend="fast")


def test_logits_equal_the_builtin_backend_plain_padded_and_packed(pair):
    family, ref, ours = pair
    tol = TOLS.get(family, TOL)
    ids = torch.randint(1, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids).logits).abs().max() < tol
        a = ref(ids, position_ids=PACKED_POS, use_cache=False).logits
        b = ours(ids, position_ids=PACKED_POS, use_cache=False).logits
        assert (a - b).abs().max() < tol
        # The documents matter (the test could fail): unpacked logits differ.
        assert (ours(ids, use_cache=False).logits - b).abs().max() > 1e-3
        if family == "gemma2":
            # transformers' float64 eager Gemma2 turns left-padded rows into NaN (its float64 mask minimum
            # becomes -inf in the float32 softmax); compare padding in float32, where it is finite.
            ref, ours = _pair(family, torch.float32)
            tol = 1e-5
        pad = torch.ones(2, 16, dtype=torch.long)
        pad[0, :5] = 0  # left padding, as generate() pads
        a, b = ref(ids, attention_mask=pad).logits, ours(ids, attention_mask=pad).logits
        assert (a[1] - b[1]).abs().max() < tol and (a[0, 5:] - b[0, 5:]).abs().max() < tol


def test_packed_rows_run_per_document_on_the_varlen_kernel(pair):
    family, ref, ours = pair
    ids = torch.randint(1, 120, (2, 16), generator=torch.Generator().manual_seed(2))
    if family == "gemma2":  # softcapped scores: only the math kernel computes them, and the dispatcher says so
        with torch.no_grad():
            ours(ids, position_ids=PACKED_POS, use_cache=False)
        attn = ours.model.layers[0].self_attn
        assert attn.dist_mha_backend == "math" and "logit_softcap" in attn.dist_mha_backend_reason
        return
    ours.set_attn_implementation(hf.register("dist_mha_varlen", attention_backend="varlen"))
    try:
        with torch.no_grad():
            b = ours(ids, position_ids=PACKED_POS, use_cache=False).logits
            a = ref(ids, position_ids=PACKED_POS, use_cache=False).logits
        assert (a - b).abs().max() < TOL
        assert {layer.self_attn.dist_mha_backend for layer in ours.model.layers} == {"varlen"}
    finally:
        ours.set_attn_implementation(hf.NAME)


# The two cache kinds: Mistral's sliding window, Gemma2's hybrid (sliding + full) cache.
@pytest.mark.parametrize("pair", ["mistral", "gemma2"], indirect=True)
def test_greedy_generation_with_hf_cache_equals_the_builtin_backend(pair):
    family, ref, ours = pair
    prompt = torch.randint(1, 120, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ref.generate(prompt, **kw), ours.generate(prompt, **kw))


def test_a_backend_without_our_mask_entry_would_lose_the_window_and_the_documents():
    # Why register() adds a mask function too: without it transformers hands the backend no mask at all.
    from transformers import AttentionInterface

    ref, _ = _pair("mistral")
    bare = copy.deepcopy(ref)
    AttentionInterface.register("dist_mha_bare", lambda *a, **k: hf.attention_forward(*a, **k))
    bare.set_attn_implementation("dist_mha_bare")
    ids = torch.randint(1, 120, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ref(ids).logits - bare(ids).logits).abs().max() > 1e-3  # sliding_window=5 ignored


def test_gpt_oss_attention_sinks_join_the_softmax():
    # gpt-oss is not loadable by from_hf (mixture-of-experts MLP), but its attention runs here: the module's
    # `sinks` (one logit per head) go to the kernel. Float32: its experts refuse float64.
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = GptOssConfig(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation(hf.register())
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # large enough to matter
        ours.load_state_dict(ref.state_dict())
        ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(7))
        assert (ref(ids).logits - ours(ids).logits).abs().max() < 1e-5
        for layer in ours.model.layers:
            layer.self_attn.sinks.zero_()
        assert (ref(ids).logits - ours(ids).logits).abs().max() > 1e-4  # the sinks were used

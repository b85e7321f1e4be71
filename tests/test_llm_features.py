"""Rotary positions, position ids, QK-norm, soft-capping, sinks and the score scale (issue 17), one device.

Against Hugging Face's own modules (transformers 5, built locally with random
weights): float32 outputs and gradients to 1e-5; bfloat16 within the gap
between Hugging Face's own bfloat16 and float32 results. Against float64
references of our own: 1e-12. The parallel layouts are in test_llm_layouts.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_mha import GroupQueryAttention, MultiHeadAttention
from dist_mha.attention import rotary
from dist_mha.attention.rope import Rope

transformers = pytest.importorskip("transformers", reason="the reference for RoPE, QK-norm, softcap and sinks")
import hf_attention as hf  # noqa: E402

B, T = 2, 12

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "truncate": False},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
                 "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 5.0, 8.0]},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


def _x(dtype=torch.float32, seed=1, n=T):
    return torch.randn(B, n, hf.D, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- rotary frequencies -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ROPES))
def test_rope_frequencies_and_scaling_equal_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8, max_position_embeddings=12,
                                   rope_parameters=dict(ROPES[name]))
    params = dict(cfg.rope_parameters, max_position_embeddings=12)
    ours = Rope.from_dict(params, 8)
    for longest in (None, 20):  # longrope and dynamic change with the call's longest position
        if name == "default":
            theirs, scaling = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
        else:
            theirs, scaling = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu", longest)
        assert torch.allclose(ours.inverse_frequencies(longest), theirs.double(), rtol=1e-6, atol=0), name
        assert math.isclose(ours.attention_scaling(), scaling, rel_tol=1e-12), name


def test_rope_arguments_are_checked_by_name():
    cases = [({"rope_type": "nope"}, "rope_type"), ({"rope_theta": -1.0}, "rope_theta"), ({"factr": 2.0}, "factr"),
             ({"rope_type": "linear"}, "factor"), ({"partial_rotary_factor": 0.1}, "partial_rotary_factor"),
             ({"interleaved": "yes"}, "interleaved"), ({"rope_type": "longrope", "short_factor": [1.0],
              "long_factor": [1.0], "original_max_position_embeddings": 8}, "short_factor")]
    for rope, name in cases:
        with pytest.raises(ValueError, match=name):
            MultiHeadAttention(2, 8, rope=rope)
    with pytest.raises(ValueError, match="qk_norm"):
        MultiHeadAttention(2, 8, qk_norm="layer")
    with pytest.raises(ValueError, match="logit_softcap"):
        MultiHeadAttention(2, 8, logit_softcap=-1.0)
    with pytest.raises(ValueError, match="rank-3"):
        MultiHeadAttention(2, 8, rope={}, attention_axes=(1, 2), query_shape=(None, 3, 4, 8))


def test_dynamic_rope_refuses_a_cache():
    layer = MultiHeadAttention(4, 8, query_shape=hf.D, rope=dict(ROPES["dynamic"], max_position_embeddings=8))
    with pytest.raises(ValueError, match="dynamic"):
        layer(_x(n=4), _x(n=4), use_causal_mask=True, cache=layer.init_cache(B, 8))


def test_extras_round_trip_through_get_config_and_a_default_config_stays_keras():
    kw = dict(rope=ROPES["yarn"], qk_norm="rms", qk_norm_eps=1e-5, logit_softcap=30.0, attention_sinks=True,
              scale=0.25, output_bias=False)
    layer = GroupQueryAttention(8, 4, 2, **kw)
    config = layer.get_config()
    assert {k: config[k] for k in kw} == kw
    again = GroupQueryAttention.from_config(config, query_shape=hf.D)
    assert again.get_config() == config
    assert not set(kw) & set(GroupQueryAttention(8, 4, 2).get_config())


# -- rotation, QK-norm: the pieces ------------------------------------------------------------------

@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rotation_is_the_pairwise_turn_and_its_backward_is_exact(interleaved, fraction):
    rope = Rope.from_dict({"interleaved": interleaved, "partial_rotary_factor": fraction}, 8)
    pos = torch.tensor([[0, 3, 7, 100]])
    x = torch.randn(2, 4, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = rotary.angles(rope, pos, torch.float64)
    out = rotary.rotate(rope, cos, sin, x)
    R = rope.rotary_dim
    inv = 1.0 / 10000.0 ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    theta = pos[..., None].double() * inv  # (1, T, R/2)
    idx = torch.arange(R).view(R // 2, 2) if interleaved else torch.arange(R).view(2, R // 2).t()
    a, b = x[..., idx[:, 0]], x[..., idx[:, 1]]
    c, s = theta.cos()[:, :, None], theta.sin()[:, :, None]
    expected = x.detach().clone()
    expected[..., idx[:, 0]], expected[..., idx[:, 1]] = (a * c - b * s).detach(), (b * c + a * s).detach()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: rotary.rotate(rope, cos, sin, t), (x,))


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_fused_norm_and_rotation_equal_the_two_steps_with_exact_gradients(fraction):
    rope = Rope.from_dict({"partial_rotary_factor": fraction}, 8)
    pos = torch.tensor([[0, 3, 7, 100]])
    cos, sin = rotary.angles(rope, pos, torch.float64)
    x, y = (torch.randn(2, 4, n, 8, dtype=torch.float64, requires_grad=True) for n in (3, 1))
    w, v = (torch.rand(8, dtype=torch.float64, requires_grad=True) + 0.5 for _ in range(2))
    fused = rotary.rotate(rope, cos, sin, x, y, norm_weights=(w, v), eps=1e-6)
    steps = rotary.rotate(rope, cos, sin, torch.nn.functional.rms_norm(x, (8,), w, 1e-6),
                          torch.nn.functional.rms_norm(y, (8,), v, 1e-6))
    for a, b in zip(fused, steps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda *t: rotary.rotate(rope, cos, sin, t[0], t[1], norm_weights=t[2:], eps=1e-6), (x, y, w, v))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("batch", [1, 64])  # below and above the element count where inference takes fewer ops
def test_inference_rotation_equals_the_autograd_node(interleaved, fraction, batch):
    rope = Rope.from_dict({"interleaved": interleaved, "partial_rotary_factor": fraction}, 8)
    pos = torch.arange(16)[None]
    cos, sin = rotary.angles(rope, pos, torch.float64)
    x, y = (torch.randn(batch, 16, n, 8, dtype=torch.float64) for n in (4, 2))
    w = torch.rand(8, dtype=torch.float64) + 0.5
    graph = rotary.rotate(rope, cos, sin, x.requires_grad_(), y, norm_weights=(w, None))
    with torch.no_grad():
        plain = rotary.rotate(rope, cos, sin, x, y, norm_weights=(w, None))
    for a, b in zip(graph, plain):
        torch.testing.assert_close(b, a.detach(), rtol=0, atol=1e-14)
    # against the two steps written out: RMSNorm, then the rotation of the reference test above
    steps = rotary.rotate(rope, cos, sin, torch.nn.functional.rms_norm(x.detach(), (8,), w, 1e-6))
    torch.testing.assert_close(plain[0], steps, rtol=0, atol=1e-14)


def test_rms_norm_follows_transformers_order_in_bfloat16():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(8, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8).bfloat16()
    assert torch.equal(rotary.rms_norm(x, norm.weight, 1e-6), norm(x))


# -- against Hugging Face's attention modules -------------------------------------------------------

CASES = [("llama", "default", False), ("llama", "llama3", False), ("llama", "yarn", False),
         ("llama", "longrope", False), ("llama", "linear", False), ("llama", "dynamic", False),
         ("qwen3", "default", False), ("gemma2", "default", True), ("gemma2", "default", False),
         ("gpt_oss", "yarn_mscale", True)]


def _compare(family, rope, sliding, dtype, positions=None):
    extra = {} if rope == "default" else {"rope_parameters": dict(ROPES[rope])}
    attn, rot, cfg = hf.hf_attention(family, dtype, **extra)
    ours = hf.ours_like(family, attn, cfg, sliding)
    x = _x(dtype)
    pos = torch.arange(T)[None].expand(B, T) if positions is None else positions
    xh, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = hf.hf_forward(attn, rot, cfg, xh, pos, sliding)
    out = ours(xo, xo, use_causal_mask=True, position_ids=None if positions is None else positions)
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    (ref.float() * probe.float()).sum().backward()
    (out.float() * probe.float()).sum().backward()
    grads = [w.grad for w in ours.weights]
    return (out, ref), (xo.grad, xh.grad), list(zip(grads, hf.hf_grads(attn)))


@pytest.mark.parametrize("family,rope,sliding", CASES)
def test_layer_equals_transformers_module_in_float32(family, rope, sliding):
    (out, ref), (gx, gx_ref), weight_grads = _compare(family, rope, sliding, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for got, want in weight_grads:
        torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-5, atol=1e-5)


def test_layer_equals_transformers_with_packed_position_ids():
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    (out, ref), (gx, gx_ref), _ = _compare("llama", "llama3", False, torch.float32, pos)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,rope,sliding", [("llama", "yarn", False), ("qwen3", "default", False),
                                                 ("gemma2", "default", True), ("gpt_oss", "yarn_mscale", True)])
def test_layer_in_bfloat16_is_within_transformers_own_bfloat16_gap(family, rope, sliding):
    (out32, ref32), _, _ = _compare(family, rope, sliding, torch.float32)
    (out16, ref16), (gx16, gx_ref16), _ = _compare(family, rope, sliding, torch.bfloat16)
    _, (gx32, _), _ = _compare(family, rope, sliding, torch.float32)
    gap = (ref16.float() - ref32).abs().max()
    assert (out16.float() - ref32).abs().max() <= 1.5 * gap + 1e-3, (float(gap), family)
    gap_grad = (gx_ref16.float() - gx32).abs().max()
    assert (gx16.float() - gx32).abs().max() <= 1.5 * gap_grad + 1e-3, (float(gap_grad), family)


# -- exactness in float64, packing, decoding ------------------------------------------------------

def _reference64(layer, x, positions, window=None):
    """Float64 attention written out: projections, QK-norm, rotation with float64 angles, softcap, sinks."""
    w = [torch.as_tensor(t).double() for t in layer.get_weights()]
    names = ["qk", "qb", "kk", "kb", "vk", "vb", "ok", "ob"][: len(w)]
    W = dict(zip(names, w))
    extra = w[len(names):]
    N, Kh, H = layer.num_query_heads, layer.num_key_value_heads, layer.head_dim
    q = torch.einsum("btd,dnh->btnh", x, W["qk"]) + W["qb"]
    k = torch.einsum("btd,dnh->btnh", x, W["kk"]) + W["kb"]
    v = torch.einsum("btd,dnh->btnh", x, W["vk"]) + W["vb"]
    if layer._qk_norm:
        qn, kn, *extra = extra
        q = q / q.square().mean(-1, keepdim=True).add(layer._qk_norm_eps).sqrt() * qn
        k = k / k.square().mean(-1, keepdim=True).add(layer._qk_norm_eps).sqrt() * kn
    inv = layer._rope.inverse_frequencies()
    ang = positions[..., None].double() * inv
    scaling = layer._rope.attention_scaling()  # YaRN's factor on cos and sin
    c, s = ang.cos()[:, :, None] * scaling, ang.sin()[:, :, None] * scaling

    def turn(t):
        a, b = t[..., : H // 2], t[..., H // 2:]
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    q, k = turn(q), turn(k)
    k, v = k.repeat_interleave(N // Kh, 2), v.repeat_interleave(N // Kh, 2)
    sc = torch.einsum("btnh,bsnh->bnts", q * layer._scale, k)
    if layer._logit_softcap:
        sc = torch.tanh(sc / layer._logit_softcap) * layer._logit_softcap
    i, j = torch.arange(x.shape[1])[:, None], torch.arange(x.shape[1])[None]
    allowed = (j <= i) & ((i - j) < window if window else True)
    sc = sc.masked_fill(~allowed, float("-inf"))
    if layer._attention_sinks:
        sc = torch.cat([sc, extra[-1].view(1, -1, 1, 1).expand(*sc.shape[:-1], 1)], -1)
    p = sc.softmax(-1)[..., : x.shape[1]]
    o = torch.einsum("bnts,bsnh->btnh", p, v)
    return torch.einsum("btnh,nhd->btd", o, W["ok"]) + W["ob"]


FEATURES = {
    "rope": dict(rope=ROPES["llama3"]),
    "qk_norm": dict(rope=ROPES["default"], qk_norm="rms"),
    "softcap_scale": dict(rope=ROPES["yarn"], logit_softcap=2.0, scale=0.3),
    "sinks_window": dict(rope=ROPES["default"], attention_sinks=True, sliding_window=4),
}


def _feature_layer(kw, dtype=torch.float64):
    torch.manual_seed(0)
    layer = GroupQueryAttention(8, 4, 2, query_shape=hf.D, dtype=dtype, **kw)
    with torch.no_grad():
        for name in ("query_norm", "key_norm"):
            if name in layer._modules:
                layer._modules[name].weight.uniform_(0.5, 1.5)
        if getattr(layer, "sinks", None) is not None:
            layer.sinks.normal_()
    return layer


@pytest.mark.parametrize("name", list(FEATURES))
def test_float64_equals_a_float64_reference_and_float32_to_1e_6(name):
    layer = _feature_layer(FEATURES[name])
    x = _x(torch.float64)
    ref = _reference64(layer, x, torch.arange(T)[None], FEATURES[name].get("sliding_window"))
    for backend in (None, "math"):
        layer._attention_backend = backend
        torch.testing.assert_close(layer(x, x, use_causal_mask=True), ref, rtol=0, atol=1e-12)
    layer32 = _feature_layer(FEATURES[name], torch.float32)
    layer32.set_weights(layer.get_weights())
    torch.testing.assert_close(layer32(x.float(), x.float(), use_causal_mask=True).double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(FEATURES))
def test_packed_documents_equal_each_document_alone(name):
    layer = _feature_layer(FEATURES[name])
    x = _x(torch.float64)
    seg = torch.tensor([[0] * 5 + [1] * 7, [3] * 12])
    packed = layer(x, x, use_causal_mask=True, segment_ids=seg)
    first, second = layer(x[:1, :5], x[:1, :5], use_causal_mask=True), layer(x[:1, 5:], x[:1, 5:], use_causal_mask=True)
    torch.testing.assert_close(packed[:1], torch.cat([first, second], 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(packed[1:], layer(x[1:], x[1:], use_causal_mask=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(FEATURES))
def test_prefill_then_steps_equal_the_full_forward(name):
    layer = _feature_layer(FEATURES[name]).eval()
    x = _x(torch.float64)
    full = layer(x, x, use_causal_mask=True)
    cache = layer.init_cache(B, T)
    outs = [layer(x[:, :5], x[:, :5], use_causal_mask=True, cache=cache)]
    outs += [layer(x[:, t:t + 1], x[:, t:t + 1], use_causal_mask=True, cache=cache) for t in range(5, T)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)


def test_explicit_position_ids_and_cross_attention_pairs():
    layer = _feature_layer(FEATURES["rope"])
    x = _x(torch.float64)
    default = layer(x, x, use_causal_mask=True)
    given = layer(x, x, use_causal_mask=True, position_ids=torch.arange(T)[None].expand(B, T))
    torch.testing.assert_close(given, default, rtol=0, atol=0)
    # Rotary attention sees relative positions: a shift changes nothing, a stretch does.
    shifted = layer(x, x, use_causal_mask=True, position_ids=torch.arange(T)[None].expand(B, T) + 7)
    torch.testing.assert_close(shifted, default, rtol=0, atol=1e-12)
    stretched = layer(x, x, use_causal_mask=True, position_ids=3 * torch.arange(T)[None].expand(B, T))
    assert (stretched - default).abs().max() > 1e-3
    pair = (3 * torch.arange(T)[None].expand(B, T), 3 * torch.arange(T)[None].expand(B, T))
    torch.testing.assert_close(layer(x, x, use_causal_mask=True, position_ids=pair), stretched, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="position_ids"):
        layer(x, x, position_ids=torch.arange(T - 1)[None].expand(B, T - 1))


def test_default_positions_equal_explicit_ones_for_cross_attention_and_survive_inference_mode():
    layer = _feature_layer(FEATURES["rope"])
    x, ctx = _x(torch.float64), _x(torch.float64)[:, :5]
    pair = (torch.arange(T)[None].expand(B, T), torch.arange(5)[None].expand(B, 5))
    torch.testing.assert_close(layer(x, ctx), layer(x, ctx, position_ids=pair), rtol=0, atol=0)
    # The default tables are cached per rope; a training call after an inference_mode one gets the same
    # values and a backward.
    with torch.inference_mode():
        ref = layer(x, x, use_causal_mask=True)
    y = x.clone().requires_grad_()
    out = layer(y, y, use_causal_mask=True)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)
    assert y.grad is not None and torch.isfinite(y.grad).all()


# -- which kernel serves which feature --------------------------------------------------------------

def test_sdpa_serves_sinks_exactly_and_refuses_softcap_with_the_reason():
    layer = _feature_layer(FEATURES["sinks_window"])
    x = _x(torch.float64)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 9:] = False
    for call in (dict(use_causal_mask=True), dict(value_mask=keep), dict(use_causal_mask=True, value_mask=keep)):
        layer._attention_backend = None
        fast = layer(x, x, **call)
        assert layer.last_backend == "sdpa", layer.last_backend_reason
        layer._attention_backend = "math"
        torch.testing.assert_close(fast, layer(x, x, **call), rtol=0, atol=1e-12)
    capped = _feature_layer(FEATURES["softcap_scale"])
    capped(x, x, use_causal_mask=True)
    assert capped.last_backend == "math" and "logit_softcap" in capped.last_backend_reason


def test_flash_attn_builds_get_softcap_and_learnable_sinks_where_they_take_them(fake_flash):
    from flash_fakes import calls

    from dist_mha.attention.kernels import AttentionRequest
    from dist_mha.attention.kernels import math as math_kernel
    from dist_mha.attention.masks import MaskSpec

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, n, 8, generator=g).bfloat16() for n in (4, 2, 2))
    sinks = torch.randn(4, generator=g)
    req = AttentionRequest(q, k, v, MaskSpec(causal=True), 8 ** -0.5, softcap=2.0, sinks=sinks)
    flash = fake_flash("fa2")
    assert any("no learnable_sink" in r for r in flash.refusals(req))
    flash = fake_flash("fa4_alone")
    out, _ = flash.run(req)
    (call,) = calls("flash_attn.cute")
    assert call["softcap"] == 2.0 and torch.equal(call["learnable_sink"], sinks.float())
    exact = AttentionRequest(q.float(), k.float(), v.float(), MaskSpec(causal=True), 8 ** -0.5, softcap=2.0, sinks=sinks)
    torch.testing.assert_close(out.float(), math_kernel.run(exact)[0], rtol=2e-2, atol=2e-2)


def test_flash_attn_rotary_kernel_gets_the_table_offset_and_pair_layout(fake_flash, monkeypatch):
    from dist_mha.attention import rotary as rot
    from dist_mha.engine import stages

    fake_flash("fa2")
    monkeypatch.setattr(rot, "kernel_takes", lambda x: True)  # CPU tensors stand in for CUDA ones
    import flash_attn.layers.rotary as fake

    for interleaved in (False, True):
        layer = _feature_layer(dict(rope=dict(ROPES["default"], interleaved=interleaved)), torch.float32).eval()
        x = _x()
        monkeypatch.setattr(stages.rotary, "flash_rotary", lambda: fake.apply_rotary_emb)
        cache = layer.init_cache(B, T)
        prompt, token = x[:, :5], x[:, 5:6]
        layer(prompt, prompt, use_causal_mask=True, cache=cache)
        step = layer(token, token, use_causal_mask=True, cache=cache)
        assert fake.CALLS[-1] == dict(shape=(B, 1, 2, 8), table=(6, 4), interleaved=interleaved, offset=5)
        monkeypatch.setattr(stages.rotary, "flash_rotary", lambda: None)
        cache.reset()
        layer(prompt, prompt, use_causal_mask=True, cache=cache)
        torch.testing.assert_close(layer(token, token, use_causal_mask=True, cache=cache), step,
                                   rtol=1e-6, atol=1e-6)

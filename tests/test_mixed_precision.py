"""Keras mixed precision (`dtype="mixed_bfloat16"` / `"mixed_float16"`), against real Keras 3.

Keras keeps float32 weights, casts floating inputs to the compute dtype,
computes in it and returns it. Tolerance: one unit in the last place of the
compute dtype at the outputs' magnitude (bf16 1/128, fp16 1/1024, relative),
since the two sides round intermediate products at different points (a fused
GEMM + bias here, a separate bias add in Keras).
"""

from __future__ import annotations

import pytest
import torch

from dist_mha import GroupQueryAttention, MultiHeadAttention
from keras_oracle import keras

POLICIES = {"mixed_bfloat16": (torch.bfloat16, 2**-7), "mixed_float16": (torch.float16, 2**-10)}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_mixed_policy_computes_and_returns_in_the_compute_dtype_like_keras(policy):
    compute, ulp = POLICIES[policy]
    k_layer = keras().layers.MultiHeadAttention(num_heads=4, key_dim=8, dtype=policy)
    k_layer.build((2, 6, 32), (2, 5, 32))
    ours = MultiHeadAttention(4, 8, query_shape=(2, 6, 32), value_shape=(2, 5, 32), dtype=policy)
    ours.set_weights(k_layer.get_weights())
    gen = torch.Generator().manual_seed(0)
    q, v = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    expected, expected_scores = (t.detach() for t in k_layer(q, v, return_attention_scores=True))
    out, scores = ours(q, v, return_attention_scores=True)
    assert expected.dtype == compute  # what Keras returns
    assert out.dtype == compute and scores.dtype == compute
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(out.detach().float(), expected.float(), rtol=0, atol=ulp * scale)
    torch.testing.assert_close(scores.detach().float(), expected_scores.float(), rtol=0, atol=ulp)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    ours(q, v).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())
    assert ours.get_config()["dtype"] == k_layer.get_config()["dtype"]


def test_mixed_policy_object_config_round_trip_and_self_attention_fusion(monkeypatch):
    k = keras()
    from dist_mha.engine import fused_projection

    layer = GroupQueryAttention(4, 8, num_key_value_heads=2, query_shape=32, dtype=k.DTypePolicy("mixed_bfloat16"))
    assert layer.get_config()["dtype"]["config"]["name"] == "mixed_bfloat16"
    calls = []
    real = fused_projection.fused_self_projection
    monkeypatch.setattr(fused_projection, "fused_self_projection", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(2, 6, 32)
    assert layer(x, x).dtype == torch.bfloat16
    assert calls  # the input was cast once, so query and value are still one tensor (one fused projection)
    cache = layer.init_cache(batch_size=2, max_length=8)
    assert cache.k_BLkH.dtype == torch.bfloat16

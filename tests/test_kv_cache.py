"""KV-cache decoding: a prompt then one position at a time gives the full forward's results.

Float32 logits/outputs agree to 1e-5 (the same math, summed in another
order); float64 to 1e-12.
"""

from __future__ import annotations

import pytest
import torch

from dist_mha import GroupQueryAttention, MultiHeadAttention
from dist_mha.attention.kv_cache import KVCache
from dist_mha.models.decoder import DecoderLM
from dist_mha.models.generation import generate

B, T, E = 2, 11, 16


def _steps(layer, x, prefill, cache, **call):
    outs = [layer(x[:, :prefill], x[:, :prefill], use_causal_mask=True, cache=cache, **call)]
    for t in range(prefill, x.shape[1]):
        outs.append(layer(x[:, t:t + 1], x[:, t:t + 1], use_causal_mask=True, cache=cache, **call))
    return torch.cat(outs, dim=1)


def _layer(kind, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    if kind == "mha":
        return MultiHeadAttention(4, 4, query_shape=E, dtype=dtype, **kw)
    return GroupQueryAttention(4, 8, {"gqa": 2, "mqa": 1}[kind], query_shape=E, dtype=dtype, **kw)


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("prefill", [1, 4])
@pytest.mark.parametrize("backend", [None, "math"])
def test_layer_prefill_then_steps_equals_full_causal_forward(kind, window, prefill, backend):
    layer = _layer(kind, sliding_window=window, attention_backend=backend).eval()
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(1))
    full = layer(x, x, use_causal_mask=True)
    cache = layer.init_cache(B, T + 2)
    torch.testing.assert_close(_steps(layer, x, prefill, cache), full, rtol=1e-5, atol=1e-5)
    assert cache.length == T


def test_chunked_prefill_and_key_padding_float64():
    # Chunks of several positions over a non-empty cache (a dense positional
    # mask with an offset), plus left padding passed as value_mask per chunk.
    layer = _layer("gqa", torch.float64, sliding_window=5).eval()
    x = torch.randn(B, T, E, dtype=torch.float64)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, :3] = False  # row 0 is left-padded
    full = layer(x, x, use_causal_mask=True, value_mask=keep)
    cache = layer.init_cache(B, T)
    outs, start = [], 0
    for size in (4, 3, 1, 3):
        sl = slice(start, start + size)
        outs.append(layer(x[:, sl], x[:, sl], use_causal_mask=True, value_mask=keep[:, sl], cache=cache))
        start += size
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)


def test_differentiable_decoding_gives_the_same_values_and_gradients():
    layer = _layer("gqa", torch.float64)
    x = torch.randn(B, T, E, dtype=torch.float64, requires_grad=True)
    full = layer(x, x, use_causal_mask=True)
    (g_full,) = torch.autograd.grad(full.square().sum(), x)
    inc = _steps(layer, x, 3, layer.init_cache(B, T))
    (g_inc,) = torch.autograd.grad(inc.square().sum(), x)
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_inc, g_full, rtol=0, atol=1e-12)


def test_cache_holds_only_key_value_heads():
    sizes = {kind: _layer(kind).init_cache(B, 64).nbytes for kind in ("mha", "gqa", "mqa")}
    per_head = 2 * B * 64 * 4 * 4  # keys and values, float32, head_dim 4
    assert sizes == {"mha": 4 * per_head, "gqa": 2 * per_head, "mqa": 1 * per_head}


@pytest.mark.parametrize("nkv", [None, 2, 1])
def test_decoder_prefill_plus_steps_equals_full_forward(nkv):
    torch.manual_seed(0)
    model = DecoderLM(40, 32, 32, 4, 2, num_kv_heads=nkv).eval()
    tokens = torch.randint(0, 40, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.init_cache(3, 20)
        parts = [model(tokens[:, :6], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(6, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generate_equals_argmax_of_repeated_full_forwards():
    torch.manual_seed(0)
    model = DecoderLM(40, 32, 32, 4, 2, num_kv_heads=1).eval()
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    got = generate(model, prompt, 9)
    expected = prompt
    with torch.no_grad():
        for _ in range(9):
            expected = torch.cat([expected, model(expected)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, expected)


def test_cache_errors_name_what_to_do():
    layer = _layer("gqa").eval()
    x = torch.randn(B, 5, E)
    cache = layer.init_cache(B, 6)
    layer(x, x, use_causal_mask=True, cache=cache)
    with pytest.raises(ValueError, match=r"(?s)holds 5 positions.*adds 5.*max_length=6"):
        layer(x, x, use_causal_mask=True, cache=cache)
    with pytest.raises(ValueError, match=r"`cache`.*KVCache.*dict"):
        layer(x, x, cache={})
    with pytest.raises(ValueError, match=r"(?s)cache of \(batch.*init_cache"):
        layer(torch.randn(3, 1, E), torch.randn(3, 1, E), use_causal_mask=True, cache=layer.init_cache(B, 6))
    with pytest.raises(ValueError, match=r"(?s)use_causal_mask=True.*`value` must have the query's length"):
        layer(x[:, :1], x, use_causal_mask=True, cache=layer.init_cache(B, 9))
    with pytest.raises(ValueError, match=r"max_length.*positive int"):
        KVCache(2, 0, 1, 4, 4)
    model = DecoderLM(10, 8, 16, 2, 1)
    with pytest.raises(ValueError, match=r"max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))

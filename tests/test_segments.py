"""Packed sequences (`segment_ids`): exactly the equivalent `attention_mask`, on every path.

Float64 values and gradients to 1e-12 against the dense mask Keras semantics
define: `(q_ids[:, :, None] == k_ids[:, None, :]) & (k_ids >= 0)[:, None, :]`,
combined with the other masks, causal and the window.
"""

from __future__ import annotations

import pytest
import torch

from dist_mha import GroupQueryAttention, MultiHeadAttention
from dist_mha.attention.segments import document_positions, segment_mask
from dist_mha.models.decoder import DecoderLM

B, T, S, E = 2, 12, 9, 16
SEG = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, -1, -1], [5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7, -1]])
KSEG = torch.tensor([[0, 0, 1, 1, 1, 2, 2, -1, 9], [5, 5, 7, 7, 7, 7, -1, -1, 8]])


@pytest.mark.parametrize("backend", [None, "math"])
@pytest.mark.parametrize("extra", [
    dict(), dict(use_causal_mask=True), dict(value_mask="pad"), dict(query_mask="pad"),
    dict(attention_mask="dense", use_causal_mask=True)], ids=["plain", "causal", "value_mask", "query_mask", "dense"])
@pytest.mark.parametrize("window", [None, 3])
def test_self_attention_segments_equal_the_equivalent_attention_mask(backend, extra, window):
    g = torch.Generator().manual_seed(0)
    extra = dict(extra)
    if extra.get("value_mask") == "pad":
        extra["value_mask"] = torch.rand(B, T, generator=g) > 0.3
    if extra.get("query_mask") == "pad":
        extra["query_mask"] = torch.rand(B, T, generator=g) > 0.3
    dense = None
    if extra.get("attention_mask") == "dense":
        dense = torch.rand(B, T, T, generator=g) > 0.3
        extra.pop("attention_mask")
    torch.manual_seed(0)
    layer = GroupQueryAttention(4, 4, 2, query_shape=E, dtype=torch.float64, attention_backend=backend,
                                sliding_window=window, use_gate=True)
    x = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    equivalent = segment_mask(SEG, SEG)[:, 0] if dense is None else segment_mask(SEG, SEG)[:, 0] & dense
    results = []
    for call in (dict(extra, segment_ids=SEG, **({} if dense is None else {"attention_mask": dense})),
                 dict(extra, attention_mask=equivalent)):
        xi = x.clone().requires_grad_()
        for p in layer.parameters():
            p.grad = None
        out = layer(xi, xi, **call)
        out.square().sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in layer.weights])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", [None, "math"])
def test_cross_attention_segment_pair(backend):
    torch.manual_seed(0)
    layer = MultiHeadAttention(2, 4, query_shape=E, value_shape=10, dtype=torch.float64, attention_backend=backend)
    x = torch.randn(B, T, E, dtype=torch.float64)
    y = torch.randn(B, S, 10, dtype=torch.float64)
    got = layer(x, y, segment_ids=(SEG, KSEG), use_causal_mask=True)
    expected = layer(x, y, attention_mask=segment_mask(SEG, KSEG)[:, 0], use_causal_mask=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # Padding queries (negative id) have nothing to attend to: zero context, so the output is the bias.
    bias = layer.output_dense.bias
    torch.testing.assert_close(got[0, 10], bias.expand_as(got[0, 10]), rtol=0, atol=1e-12)


def test_segment_id_errors_name_the_argument():
    layer = MultiHeadAttention(2, 4, query_shape=E)
    x = torch.randn(B, T, E)
    with pytest.raises(ValueError, match=r"`segment_ids`.*integer.*float32"):
        layer(x, x, segment_ids=torch.zeros(B, T))
    with pytest.raises(ValueError, match=r"`segment_ids`.*expected shape \(2, 12\).*\(2, 11\)"):
        layer(x, x, segment_ids=torch.zeros(B, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pass a pair \(query_ids, key_ids\)"):
        layer(x, torch.randn(B, S, E), segment_ids=torch.zeros(B, T, dtype=torch.long))
    with pytest.raises(ValueError, match=r"segment_ids.*cache"):
        layer.eval()(x, x, use_causal_mask=True, segment_ids=SEG, cache=layer.init_cache(B, T))


def test_document_positions_restart_at_each_document():
    assert document_positions(SEG).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1],
                                                 [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0]]


@pytest.mark.parametrize("nkv", [None, 1])
def test_decoder_on_a_packed_row_equals_each_document_alone(nkv):
    torch.manual_seed(0)
    model = DecoderLM(30, 16, 32, 4, 2, num_kv_heads=nkv, dtype=torch.float64).eval()
    docs = [torch.randint(0, 30, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 3, 6)]
    packed = torch.cat(docs + [torch.zeros(2, dtype=torch.long)])[None]  # 14 tokens + 2 padding
    ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)] + [torch.full((2,), -1)])[None]
    with torch.no_grad():
        logits = model(packed, segment_ids=ids)
        start = 0
        for d in docs:
            alone = model(d[None])
            torch.testing.assert_close(logits[:, start:start + len(d)], alone, rtol=0, atol=1e-12)
            start += len(d)

"""torch.compile and torch.autocast."""

from __future__ import annotations

import pytest
import torch

from dist_mha import MultiHeadAttention


@pytest.mark.parametrize("kwargs", [{}, dict(use_causal_mask=True), dict(pad=True)], ids=["plain", "causal", "padded"])
def test_forward_has_no_graph_breaks_at_tp1(kwargs):
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 8, query_shape=32)
    x = torch.randn(2, 6, 32)
    if kwargs.pop("pad", False):
        kwargs["value_mask"] = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    explanation = dynamo.explain(layer)(x, x, **kwargs)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def test_compiled_layer_matches_eager():
    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 8, query_shape=32, dtype=torch.float64)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    compiled = torch.compile(layer, backend="eager")  # traces with dynamo; no C++ toolchain needed
    torch.testing.assert_close(compiled(x, x, use_causal_mask=True), layer(x, x, use_causal_mask=True))


def test_autocast_bf16_on_cpu_runs_in_bf16_and_stays_close():
    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 8, query_shape=32)
    x = torch.randn(2, 6, 32)
    reference = layer(x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=5e-2, atol=5e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())

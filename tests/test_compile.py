"""torch.compile and torch.autocast."""

from __future__ import annotations

import pytest
import torch

from dist_mha import MultiHeadAttention


# T=6: 12 tokens < 32 features (one GEMM per projection); T=24: 48 >= 32 (one concatenated GEMM).
@pytest.mark.parametrize("T", [6, 24], ids=["few_tokens", "many_tokens"])
@pytest.mark.parametrize("kwargs", [{}, dict(use_causal_mask=True), dict(pad=True)], ids=["plain", "causal", "padded"])
def test_forward_has_no_graph_breaks_at_tp1(kwargs, T):
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 8, query_shape=32)
    x = torch.randn(2, T, 32)
    kwargs = dict(kwargs)  # the parametrized dict is shared between the T cases
    if kwargs.pop("pad", False):
        kwargs["value_mask"] = torch.arange(T)[None, :] < torch.tensor([[T], [T // 2]])
    explanation = dynamo.explain(layer)(x, x, **kwargs)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


@pytest.mark.parametrize("T", [6, 24], ids=["few_tokens", "many_tokens"])
def test_compiled_layer_matches_eager_with_gradients(T):
    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 8, query_shape=32, dtype=torch.float64)
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(layer, backend="eager")  # traces with dynamo; no C++ toolchain needed
    got = compiled(x, x, use_causal_mask=True)
    want = layer(x, x, use_causal_mask=True)
    torch.testing.assert_close(got, want)
    params = list(layer.parameters())
    probe = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad((got * probe).sum(), [x, *params]),
                    torch.autograd.grad((want * probe).sum(), [x, *params])):
        torch.testing.assert_close(g, w)


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

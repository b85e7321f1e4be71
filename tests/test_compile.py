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


def _dropout_modules():
    from dist_mha.models.block import TransformerBlock

    torch.manual_seed(0)
    return {
        "layer": (MultiHeadAttention(4, 8, query_shape=32, dropout=0.2, seed=3), lambda m, x: m(x, x, training=True)),
        "layer_padded": (MultiHeadAttention(4, 8, query_shape=32, dropout=0.2, seed=3),
                         lambda m, x: m(x, x, value_mask=torch.arange(6)[None] < torch.tensor([[6], [3]]),
                                        training=True)),
        # Attention dropout and two residual dropouts, every one from a stream.
        "block": (TransformerBlock(32, 4, dropout=0.1, attention_dropout=0.2, seed=3), lambda m, x: m(x)),
    }


@pytest.mark.parametrize("name", ["layer", "layer_padded", "block"])
def test_dropout_from_rng_streams_compiles_without_graph_breaks(name):
    import torch._dynamo as dynamo

    module, call = _dropout_modules()[name]
    module.train()
    x = torch.randn(2, 6, 32)
    explanation = dynamo.explain(lambda t: call(module, t))(x)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def test_compiled_stream_dropout_is_reproducible_resumable_and_drops_the_rate():
    def run(state=None, calls=2):
        torch.manual_seed(0)
        layer = MultiHeadAttention(4, 8, query_shape=32, dropout=0.3, seed=5, attention_backend="math")
        if state is not None:
            layer.load_state_dict(state)
        compiled = torch.compile(layer, backend="eager")
        x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
        outs = [compiled(x, x, training=True) for _ in range(calls)]
        return outs, {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in layer.state_dict().items()}

    (a1, a2), _ = run()
    (b1, b2), _ = run()
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # same seed, same masks
    assert not torch.equal(a1, a2)  # the stream moves on between calls
    (c1,), state = run(calls=1)
    (d2,), _ = run(state=state, calls=1)
    assert torch.equal(d2, a2)  # a checkpoint taken after one compiled call resumes the sequence

    from dist_mha.rng.streams import RNGStream, dropout

    stream = RNGStream(9)
    ones = torch.ones(256, 1024)
    kept = torch.compile(lambda t: dropout(t, 0.3, stream), backend="eager")(ones)
    rate = (kept == 0).float().mean().item()
    assert abs(rate - 0.3) < 0.005  # 262144 draws: standard error 0.0009
    torch.testing.assert_close(kept[kept != 0], torch.full_like(kept[kept != 0], 1 / 0.7))

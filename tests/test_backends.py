"""SDPA vs the exact math path, for every mask form, in float32 and float64.

Tolerances: float32 1e-5 (same math, different reduction order); float64
1e-10 (the same, at double precision).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_mha import MultiHeadAttention

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
B, T, S, E = 2, 6, 9, 12


def _masks(kind, gen):
    def keep(*shape):
        m = torch.rand(*shape, generator=gen) < 0.6
        m[..., 0] = True
        return m

    return {
        "none": {},
        "query": dict(query_mask=keep(B, T)),
        "value": dict(value_mask=keep(B, S)),
        "key": dict(key_mask=keep(B, S)),
        "attention_BTS": dict(attention_mask=keep(B, T, S)),
        "attention_TS": dict(attention_mask=keep(T, S)),
        "attention_BNTS": dict(attention_mask=keep(B, 3, T, S)),
        "causal": dict(use_causal_mask=True),
        "causal_value": dict(use_causal_mask=True, value_mask=keep(B, S)),
        "causal_query": dict(use_causal_mask=True, query_mask=keep(B, T)),
        "query_value": dict(query_mask=keep(B, T), value_mask=keep(B, S)),
        "everything": dict(query_mask=keep(B, T), value_mask=keep(B, S), key_mask=keep(B, S),
                           attention_mask=keep(B, T, S), use_causal_mask=True),
        # Rows with nothing to attend to: a batch element with no valid key.
        "empty_batch": dict(value_mask=torch.tensor([[True] * S, [False] * S])),
    }[kind]


KINDS = ["none", "query", "value", "key", "attention_BTS", "attention_TS", "attention_BNTS", "causal",
         "causal_value", "causal_query", "query_value", "everything", "empty_batch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_matches_math_for_every_mask_form(kind, dtype):
    gen = torch.Generator().manual_seed(KINDS.index(kind))
    layers = {}
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        layers[backend] = MultiHeadAttention(3, 4, value_dim=5, query_shape=(B, T, E), value_shape=(B, S, 7),
                                             attention_backend=backend, dtype=dtype)
    q = torch.randn(B, T, E, dtype=dtype, generator=gen)
    v = torch.randn(B, S, 7, dtype=dtype, generator=gen)
    kwargs = _masks(kind, gen)
    outs, grads = {}, {}
    for backend, layer in layers.items():
        qq, vv = q.clone().requires_grad_(), v.clone().requires_grad_()
        out = layer(qq, vv, **kwargs)
        assert layer.last_backend == backend
        out.pow(2).sum().backward()
        outs[backend] = out.detach()
        grads[backend] = [qq.grad, vv.grad] + [p.grad for p in layer.weights]
    tol = TOL[dtype]
    torch.testing.assert_close(outs["sdpa"], outs["math"], rtol=tol, atol=tol)
    for g_sdpa, g_math in zip(grads["sdpa"], grads["math"]):
        assert torch.isfinite(g_sdpa).all()
        torch.testing.assert_close(g_sdpa, g_math, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("axes,qs,vs", [((2,), (B, 3, T, E), (B, 3, S, E)), ((1, 2), (B, 3, 4, E), (B, 2, 5, E))])
def test_sdpa_matches_math_multi_axis(axes, qs, vs):
    torch.manual_seed(0)
    a = MultiHeadAttention(2, 4, attention_axes=axes, query_shape=qs, value_shape=vs, attention_backend="sdpa", dtype=torch.float64)
    b = MultiHeadAttention(2, 4, attention_axes=axes, query_shape=qs, value_shape=vs, attention_backend="math", dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    q, v = torch.randn(qs, dtype=torch.float64), torch.randn(vs, dtype=torch.float64)
    if len(axes) == 1:
        kwargs = dict(value_mask=torch.rand(vs[:-1]) < 0.7)
        kwargs["value_mask"][..., 0] = True
    else:
        # Keras's value_mask only lines up with one attention axis; use a full mask here.
        m = torch.rand(qs[0], *qs[1:-1], *vs[1:-1]) < 0.7
        m[..., 0, 0] = True
        kwargs = dict(attention_mask=m)
    torch.testing.assert_close(a(q, v, **kwargs), b(q, v, **kwargs), rtol=1e-10, atol=1e-10)


class _SpySDPA:
    """Records what reaches torch's real SDPA (the real kernel still runs)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = F.scaled_dot_product_attention

        def spy(*args, **kwargs):
            self.calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)


def test_causal_only_uses_is_causal_without_mask_tensor(monkeypatch):
    spy = _SpySDPA(monkeypatch)
    layer = MultiHeadAttention(2, 4, query_shape=E)
    x = torch.randn(B, T, E)
    layer(x, x, use_causal_mask=True)
    (call,) = spy.calls
    assert call["attn_mask"] is None and call["is_causal"] is True


def test_query_and_key_padding_never_build_a_T_by_S_mask(monkeypatch):
    spy = _SpySDPA(monkeypatch)
    layer = MultiHeadAttention(2, 4, query_shape=E)
    q, v = torch.randn(B, T, E), torch.randn(B, S, E)
    layer(q, v, query_mask=torch.ones(B, T, dtype=torch.bool), value_mask=torch.ones(B, S, dtype=torch.bool))
    (call,) = spy.calls
    assert tuple(call["attn_mask"].shape) == (B, 1, 1, S)


def test_forced_math_and_scores_fall_back_from_sdpa():
    layer = MultiHeadAttention(2, 4, query_shape=E)
    x = torch.randn(B, T, E)
    layer(x, x)
    assert layer.last_backend == "sdpa"
    assert "flash:" in layer.last_backend_reason
    layer(x, x, return_attention_scores=True)
    assert layer.last_backend == "math"


@pytest.mark.parametrize("use_gate,use_bias", [(False, True), (True, True), (False, False)])
def test_fused_self_attention_projection_equals_separate_projections(use_gate, use_bias):
    torch.manual_seed(0)
    layer = MultiHeadAttention(3, 4, value_dim=5, use_gate=use_gate, use_bias=use_bias, query_shape=E,
                               dtype=torch.float64, kernel_regularizer="l2", activity_regularizer="l1")
    x = torch.randn(B, T, E, dtype=torch.float64, requires_grad=True)
    fused = layer(x, x, use_causal_mask=True)  # one tensor: the fused QKV GEMM
    fused_losses = [float(v) for v in layer.losses]
    fused.pow(2).sum().backward()
    g_fused = [x.grad.clone()] + [p.grad.clone() for p in layer.weights]
    layer.zero_grad()
    x.grad = None
    x2 = x.detach().clone().requires_grad_()
    separate = layer(x, x2, use_causal_mask=True)  # two tensors: separate projections
    separate.pow(2).sum().backward()
    g_sep = [x.grad + x2.grad] + [p.grad for p in layer.weights]
    torch.testing.assert_close(fused, separate, rtol=1e-12, atol=1e-12)
    assert fused_losses == pytest.approx([float(v) for v in layer.losses], rel=1e-12)
    for a, b in zip(g_fused, g_sep):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("S,has_mask,dropout_p,demoted", [
    (192, True, 0.0, True),     # mask tensor, S % 128 == 64: cuDNN's backward can give NaN dq (#196678)
    (64, True, 0.0, True),
    (192, False, 0.0, False),   # no mask tensor: torch's own choice
    (256, True, 0.0, False),
    (200, True, 0.0, False),
    (256, False, 0.1, True),    # 16 * 0.1 is not an integer: cuDNN may run 0.0625 or 0.125
    (256, False, 0.3, True),
    (256, False, 0.125, False),  # multiples of 1/16 are exact on cuDNN
    (256, False, 0.0625, False),
])
def test_cuda_sdpa_takes_cudnn_away_only_where_it_is_wrong(S, has_mask, dropout_p, demoted):
    from dist_mha.attention.kernels import sdpa

    backends = sdpa.cuda_backends(S, has_mask, dropout_p)
    if not demoted:
        assert backends is None  # no sdpa_kernel context: no host cost, torch's order untouched
    else:
        names = {b.name for b in backends}
        assert "CUDNN_ATTENTION" not in names
        assert {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"} <= names


@pytest.fixture
def sdpa_flags():
    """Restores torch's SDPA backend switches after a test flips them."""
    saved = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in ("flash", "mem_efficient", "math", "cudnn")}
    yield
    for n, on in saved.items():
        getattr(torch.backends.cuda, f"enable_{n}_sdp")(on)


def test_cuda_sdpa_never_enables_a_backend_the_user_disabled(sdpa_flags):
    from dist_mha.attention.kernels import sdpa

    torch.backends.cuda.enable_flash_sdp(False)
    names = {b.name for b in sdpa.cuda_backends(192, True, 0.1)}
    assert "FLASH_ATTENTION" not in names and "CUDNN_ATTENTION" not in names and "EFFICIENT_ATTENTION" in names
    torch.backends.cuda.enable_cudnn_sdp(False)  # the documented workaround for cuDNN bugs
    assert sdpa.cuda_backends(192, True, 0.1) is None  # nothing to take away


def test_cuda_sdpa_context_disables_cudnn_for_the_call_and_keeps_the_priority_order(sdpa_flags):
    import contextlib

    from dist_mha.attention.kernels import sdpa

    cuda = torch.device("cuda")  # only the context is built and entered: no CUDA needed
    assert isinstance(sdpa._backend_context(cuda, 192, False, 0.0), contextlib.nullcontext)
    order = torch._C._get_sdp_priority_order()
    with sdpa._backend_context(cuda, 192, True, 0.0):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch._C._get_sdp_priority_order() == order
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_sdpa_backend_context_sees_key_count_mask_and_dropout(monkeypatch):
    from dist_mha.attention.kernels import sdpa

    seen, real = [], sdpa._backend_context

    def spy(device, S, has_mask, dropout_p):
        seen.append((S, has_mask, dropout_p))
        return real(device, S, has_mask, dropout_p)

    monkeypatch.setattr(sdpa, "_backend_context", spy)
    layer = MultiHeadAttention(2, 4, query_shape=E, dropout=0.25)
    q, v = torch.randn(B, T, E), torch.randn(B, S, E)
    layer(q, q, use_causal_mask=True, training=False)
    layer(q, v, value_mask=torch.ones(B, S, dtype=torch.bool), training=True)
    assert seen == [(T, False, 0.0), (S, True, 0.25)]

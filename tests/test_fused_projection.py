"""The fused self-attention in-projection: same numbers as separate projections, no weight-sized copies."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_mha import MultiHeadAttention
from dist_mha.engine import fused_projection
from dist_mha.engine.fused_projection import fused_self_projection


@pytest.fixture(params=[True, False], ids=["concat_gemm", "per_projection_gemm"])
def concat(request, monkeypatch):
    """Runs a test through both forward paths (the device rule picks one per call; CPU alone never concatenates)."""
    monkeypatch.setattr(fused_projection, "concat_weights", lambda x_MD: request.param)
    return request.param


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _layer(use_bias=True, use_gate=False, E=16, dtype=torch.float64, value_dim=3):
    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 5, value_dim=value_dim, use_bias=use_bias, use_gate=use_gate, query_shape=E, dtype=dtype)
    with torch.no_grad():  # non-zero biases, so a dropped bias gradient shows
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("tokens", [(3, 8), (1, 5)], ids=["24_tokens", "5_tokens"])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("use_gate", [False, True], ids=["no_gate", "gate"])
def test_fused_projection_matches_separate_projections_values_and_grads(concat, tokens, use_bias, use_gate):
    layer = _layer(use_bias, use_gate)
    projs = layer._projections()
    x = torch.randn(*tokens, 16, dtype=torch.float64, requires_grad=True)
    probes = [torch.randn(*tokens, *p.out_dims, dtype=torch.float64) if p is not None else None for p in projs]

    def grads(outs):
        loss = sum((o * w).sum() for o, w in zip(outs, probes) if o is not None)
        params = [t for p in projs if p is not None for t in (p.kernel, p.bias) if t is not None]
        return torch.autograd.grad(loss, [x, *params])

    fused = fused_self_projection(projs, x)
    separate = [None if p is None else p(x) for p in projs]
    for f, s in zip(fused, separate):
        assert (f is None) == (s is None)
        if f is not None:
            torch.testing.assert_close(f, s, rtol=1e-13, atol=1e-13)
    for gf, gs in zip(grads(fused), grads(separate)):
        torch.testing.assert_close(gf, gs, rtol=1e-12, atol=1e-12)


def test_fused_projection_keeps_nothing_weight_sized_for_backward(concat):
    tokens = (4, 8)
    layer = _layer(E=16)
    projs = layer._projections()
    param_ptrs = {p.data_ptr() for p in layer.parameters()}
    x = torch.randn(*tokens, 16, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_self_projection(projs, x)
    # Only x (flattened) and the parameters themselves: a concatenated (D, W)
    # weight kept from forward to backward is what this replaced.
    assert saved
    for t in saved:
        assert t.data_ptr() in param_ptrs or t.data_ptr() == x.data_ptr(), tuple(t.shape)


def test_self_attention_backward_copies_no_weights_or_activations(concat):
    shape = (2, 8, 16)
    # value_dim == key_dim: with different head sizes torch's CPU SDPA itself
    # copies its inputs in backward, which is not what this pins.
    layer = _layer(E=16, dtype=torch.float32, value_dim=5)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x, x)
    with _OpCounter() as counter:
        out.backward(torch.randn_like(out))
    copies = {op: n for op, n in counter.ops.items() if op in ("cat", "stack", "clone", "copy_", "contiguous")}
    assert copies == {}, copies
    assert all(p.grad.is_contiguous() for p in layer.parameters())


def test_fused_projection_follows_input_dtype_and_autocast(concat):
    layer = _layer(E=16, dtype=torch.float32)
    projs = layer._projections()
    x = torch.randn(4, 8, 16)
    ref = fused_self_projection(projs, x)
    low = fused_self_projection(projs, x.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fused_self_projection(projs, x.requires_grad_())
    for r, lo, au in zip(ref, low, auto):
        if r is None:
            continue
        assert lo.dtype == torch.bfloat16 and au.dtype == torch.bfloat16
        torch.testing.assert_close(lo.float(), r, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(au.float(), r, rtol=3e-2, atol=3e-2)
    sum(a.float().sum() for a in auto if a is not None).backward()
    assert x.grad.dtype == torch.float32
    for p in layer.parameters():
        if p.grad is not None:
            assert p.grad.dtype == torch.float32


@pytest.mark.parametrize("call,gemms", [("self", 2), ("cross", 3), ("cross_key", 4)])
def test_projections_of_one_tensor_share_one_gemm(monkeypatch, call, gemms):
    # Counts the forward's GEMMs on the concatenated path (what CUDA takes for M >= D).
    monkeypatch.setattr(fused_projection, "concat_weights", lambda x_MD: True)
    layer = _layer(E=16, dtype=torch.float32, value_dim=5)
    x, y = torch.randn(2, 12, 16), torch.randn(2, 10, 16)
    args = {"self": (x, x), "cross": (x, y), "cross_key": (x, y, y.clone())}[call]
    with _OpCounter() as counter:
        out = layer(*args)
    assert counter.ops["addmm"] + counter.ops["mm"] == gemms  # q|k|v + out; q, k|v, out; q, k, v, out
    assert counter.ops["cat"] == {"self": 2, "cross": 2, "cross_key": 0}[call]  # kernels + biases
    key = args[2] if len(args) == 3 else args[1]
    # The same weights called with a distinct key tensor: every projection separate.
    ref = MultiHeadAttention(4, 5, value_dim=5, query_shape=16, value_shape=16)
    ref.set_weights(layer.get_weights())
    torch.testing.assert_close(out, ref(x, args[1], key.clone()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,tokens,expected", [("cpu", 4096, False), ("cuda", 4096, True), ("cuda", 255, False)])
def test_concat_rule_is_cuda_with_at_least_as_many_tokens_as_features(device, tokens, expected):
    # Only .device and .shape are read; a CUDA tensor cannot be made here.
    x_MD = SimpleNamespace(device=torch.device(device), shape=(tokens, 256))
    assert fused_projection.concat_weights(x_MD) is expected

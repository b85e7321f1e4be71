"""GroupQueryAttention beyond the Keras oracle: the fast kernels read grouped K/V
in place, the engine is shared with MultiHeadAttention, and bad arguments raise
clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_mha import GroupQueryAttention, MultiHeadAttention
from dist_mha.attention.kernels import AttentionRequest, sdpa
from dist_mha.attention.kernels import math as math_kernel
from dist_mha.attention.masks import MaskSpec

B, T, S, NQ, H = 2, 6, 9, 8, 4


class OpSpy(TorchDispatchMode):
    """Records every aten op with its output shapes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.calls.append((str(func), [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]))
        return out


def _repeat_like_copies(calls, kv_repeated_shapes):
    """Ops that materialise K/V repeated to N heads (any layout of the K/V-sized copy)."""
    # Views (view, expand) cost nothing; these ops write a new buffer.
    copying = ("repeat", "clone", "copy", "index_select", "cat", "stack", "gather", "empty_like")
    return [(op, shapes) for op, shapes in calls
            if any(c in op for c in copying) and any(s in kv_repeated_shapes for s in shapes)]


@pytest.mark.parametrize("nkv", [1, 2, 4])
@pytest.mark.parametrize("masks", ["none", "causal", "key_padding", "window"])
def test_sdpa_path_never_materialises_repeated_kv(nkv, masks):
    # Forward and backward of the SDPA kernel with grouped K/V: no op may
    # produce a K/V-sized tensor with N heads (the repeat Keras does).
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, NQ, H, generator=g, requires_grad=True)
    k = torch.randn(B, S, nkv, H, generator=g, requires_grad=True)
    v = torch.randn(B, S, nkv, H, generator=g, requires_grad=True)
    spec = {"none": MaskSpec(), "causal": MaskSpec(causal=True),
            "key_padding": MaskSpec(k_keep_BS=torch.rand(B, S, generator=g) > 0.3),
            "window": MaskSpec(window=3)}[masks]
    repeated = {(B, S, NQ, H), (B, NQ, S, H), (B * NQ, S, H), (B, nkv, NQ // nkv, S, H), (B, S, nkv, NQ // nkv, H)}
    with OpSpy() as spy:
        out, _ = sdpa.run(AttentionRequest(q, k, v, spec, 0.5))
        out.square().sum().backward()
    assert not _repeat_like_copies(spy.calls, repeated), _repeat_like_copies(spy.calls, repeated)
    assert any("scaled_dot_product" in op for op, _ in spy.calls)
    # ... and the spy can see a repeat when one happens (the math path's).
    with OpSpy() as spy:
        math_kernel.run(AttentionRequest(q, k, v, spec, 0.5))
    assert _repeat_like_copies(spy.calls, repeated)


def test_layer_default_backend_is_sdpa_without_repeat():
    layer = GroupQueryAttention(H, NQ, 2, query_shape=16)
    x = torch.randn(B, T, 16, requires_grad=True)
    y = torch.randn(B, S, 16, requires_grad=True)  # S != T: a K/V-sized N-head tensor is unambiguous
    repeated = {(B, S, NQ, H), (B, NQ, S, H), (B * NQ, S, H)}
    with OpSpy() as spy:
        layer(x, y, use_causal_mask=True).sum().backward()
    assert layer.last_backend == "sdpa"
    assert not _repeat_like_copies(spy.calls, repeated)


@pytest.mark.parametrize("nkv", [1, 2, 4, 8])
@pytest.mark.parametrize("call", [dict(), dict(use_causal_mask=True), dict(value_mask="pad"), dict(attention_mask="dense")])
def test_sdpa_and_math_agree_float64(nkv, call):
    g = torch.Generator().manual_seed(nkv)
    call = dict(call)
    if call.get("value_mask") == "pad":
        call["value_mask"] = torch.rand(B, S, generator=g) > 0.4
    if call.get("attention_mask") == "dense":
        call["attention_mask"] = torch.rand(B, T, S, generator=g) > 0.4
    outs = []
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        layer = GroupQueryAttention(H, NQ, nkv, query_shape=12, value_shape=10, attention_backend=backend,
                                    dtype=torch.float64, sliding_window=4)
        x = torch.randn(B, T, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
        y = torch.randn(B, S, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
        out = layer(x, y, **call)
        out.square().sum().backward()
        outs.append([out.detach(), x.grad, y.grad] + [p.grad for p in layer.weights])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_multi_head_attention_is_the_all_kv_heads_case_of_the_same_engine():
    torch.manual_seed(0)
    mha = MultiHeadAttention(num_heads=4, key_dim=H, query_shape=12, value_shape=10, use_gate=True, dtype=torch.float64)
    gqa = GroupQueryAttention(H, 4, 4, query_shape=12, value_shape=10, use_gate=True, dtype=torch.float64)
    gqa.set_weights(mha.get_weights())
    x = torch.randn(B, T, 12, dtype=torch.float64)
    y = torch.randn(B, S, 10, dtype=torch.float64)
    for call in (dict(), dict(use_causal_mask=True), dict(value_mask=torch.rand(B, S) > 0.3)):
        torch.testing.assert_close(gqa(x, y, **call), mha(x, y, **call), rtol=0, atol=0)
    assert type(gqa).forward is type(mha).forward  # one engine, one forward


def test_query_heads_not_divisible_by_kv_heads_raises_listing_valid_counts():
    with pytest.raises(ValueError, match=r"(?s)must be divisible by `num_key_value_heads`.*num_key_value_heads=3.*\[1, 2, 4, 8\]"):
        GroupQueryAttention(4, 8, 3)


@pytest.mark.parametrize("arg,value", [("head_dim", 0), ("num_query_heads", -1), ("num_key_value_heads", 2.0)])
def test_invalid_head_arguments_name_argument_and_value(arg, value):
    kwargs = dict(head_dim=4, num_query_heads=4, num_key_value_heads=2)
    kwargs[arg] = value
    with pytest.raises(ValueError, match=rf"(?s)`{arg}`.*{arg}={value!r}"):
        GroupQueryAttention(**kwargs)


def test_rank_4_inputs_raise_pointing_to_multi_head_attention():
    with pytest.raises(ValueError, match=r"(?s)rank-3.*rank 4.*MultiHeadAttention"):
        GroupQueryAttention(4, 4, 2, query_shape=(2, 3, 5, 8))


def test_unknown_keyword_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"(?s)GroupQueryAttention|grouped_query_attention.*num_heads"):
        GroupQueryAttention(4, 4, 2, num_heads=4)


def test_keras_attribute_names():
    layer = GroupQueryAttention(head_dim=4, num_query_heads=8, num_key_value_heads=2, sliding_window=5, use_gate=True)
    assert (layer.head_dim, layer.num_query_heads, layer.num_key_value_heads, layer.num_repeats) == (4, 8, 2, 4)
    assert layer.sliding_window == 5 and layer.use_gate and layer.name == "grouped_query_attention"

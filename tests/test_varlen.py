"""The varlen backend: ragged batches (key/query padding, packed documents) per sequence.

Against the exact math path in float64 (values and all gradients to 1e-12),
its refusals, what the dispatcher picks, and that no (T, S) mask is built.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_mha import GroupQueryAttention, MultiHeadAttention
from dist_mha.attention.kernels import AttentionRequest, varlen
from dist_mha.attention.masks import MaskSpec

B, T, E = 3, 16, 16


def _right(lengths, T=T):
    keep = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        keep[b, :n] = True
    return keep


RIGHT = _right([16, 9, 4])
LEFT = _right([16, 11, 6]).flip(-1)
MIDDLE = torch.zeros(B, T, dtype=torch.bool)
MIDDLE[:, 3:12] = True
MIDDLE[1] = False  # a row with no valid key
RANDOM = torch.rand(B, T, generator=torch.Generator().manual_seed(0)) > 0.4
RANDOM[:, 0] = True
SEG = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [3] * 16, [5] * 6 + [6] * 6 + [-1] * 4])

CASES = [
    ("right_causal", dict(query_mask=RIGHT, value_mask=RIGHT, use_causal_mask=True), {}),
    ("right_keys_only_causal", dict(value_mask=RIGHT, use_causal_mask=True), {}),
    ("left_causal_window", dict(query_mask=LEFT, value_mask=LEFT, use_causal_mask=True), dict(sliding_window=3)),
    ("middle_with_empty_row", dict(value_mask=MIDDLE, use_causal_mask=True), {}),
    ("random_padding", dict(value_mask=RANDOM), {}),
    ("random_padding_query_mask", dict(value_mask=RANDOM, query_mask=RIGHT), {}),
    ("segments_causal", dict(segment_ids=SEG, use_causal_mask=True), {}),
    ("segments_window_padding", dict(segment_ids=SEG, value_mask=RIGHT), dict(sliding_window=4)),
]


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("name,call,extra", CASES, ids=[c[0] for c in CASES])
def test_varlen_equals_math_float64_values_and_gradients(name, call, extra, kind):
    results = []
    for backend in ("varlen", "math"):
        torch.manual_seed(0)
        if kind == "mha":
            layer = MultiHeadAttention(4, 4, query_shape=E, dtype=torch.float64, attention_backend=backend, **extra)
        else:
            layer = GroupQueryAttention(4, 4, 2, query_shape=E, dtype=torch.float64, attention_backend=backend,
                                        use_gate=True, **extra)
        x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
        out = layer(x, x, **call)
        out.square().sum().backward()
        assert layer.last_backend == backend
        results.append([out.detach(), x.grad] + [p.grad for p in layer.weights])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _req(masks, S=T):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, 4, 4, generator=g)
    k = torch.randn(B, S, 4, 4, generator=g)
    return AttentionRequest(q, k, k.clone(), masks, 0.5)


@pytest.mark.parametrize("masks,why", [
    (MaskSpec(k_keep_BS=RANDOM, causal=True), "would shift positions"),
    (MaskSpec(dense_BNTS=torch.ones(1, 1, T, T, dtype=torch.bool), k_keep_BS=RIGHT), "attention_mask"),
    (MaskSpec(causal=True), "nothing to skip"),
    (MaskSpec(q_seg_BT=torch.tensor([[0, 1, 0] + [1] * 13] * B), k_seg_BS=torch.tensor([[0, 1, 0] + [1] * 13] * B)),
     "more than one run"),
])
def test_varlen_states_why_it_refuses(masks, why):
    reasons = varlen.refusals(_req(masks))
    assert any(why in r for r in reasons), reasons


def test_forced_varlen_that_refuses_lists_every_backend():
    layer = MultiHeadAttention(2, 4, query_shape=E, attention_backend="varlen")
    x = torch.randn(B, T, E)
    with pytest.raises(ValueError, match=r"(?s)attention_backend='varlen' cannot serve.*varlen: .*nothing to skip.*sdpa"):
        layer(x, x)


def test_dispatcher_picks_varlen_only_where_it_saves_work():
    layer = MultiHeadAttention(4, 16, query_shape=64)
    T_big = 512
    x = torch.randn(2, T_big, 64)
    half = _right([T_big // 2, T_big // 2 - 64], T_big)
    layer(x, x, query_mask=half, value_mask=half, use_causal_mask=True)
    assert layer.last_backend == "varlen"
    nearly_full = _right([T_big, T_big - 8], T_big)
    layer(x, x, value_mask=nearly_full)
    assert layer.last_backend == "sdpa" and "able, but skipped" in layer.last_backend_reason
    short = _right([10, 12], T_big)  # few, very short sequences: still worth it (tiny work), long mean keys not
    layer(x, x, value_mask=short)
    assert layer.last_backend in ("varlen", "sdpa")


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bool_shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.dtype == torch.bool:
                self.bool_shapes.append(tuple(o.shape))
        return out


@pytest.mark.parametrize("call", [dict(query_mask=RIGHT, value_mask=RIGHT, use_causal_mask=True),
                                  dict(segment_ids=SEG, use_causal_mask=True), dict(value_mask=RANDOM)],
                         ids=["padding_causal", "segments_causal", "gathered_padding"])
def test_varlen_builds_no_T_by_S_mask(call):
    layer = MultiHeadAttention(4, 4, query_shape=E, attention_backend="varlen")
    x = torch.randn(B, T, E, requires_grad=True)
    with _Shapes() as spy:
        layer(x, x, **call).sum().backward()
    assert not [s for s in spy.bool_shapes if len(s) >= 2 and s[-2:] == (T, T)], spy.bool_shapes


def test_plans_are_reused_for_the_same_mask_object_and_never_for_a_new_one():
    layer = MultiHeadAttention(4, 4, query_shape=E, attention_backend="varlen", dtype=torch.float64)
    x = torch.randn(B, T, E, dtype=torch.float64)
    keep = RIGHT.clone()
    first = layer(x, x, value_mask=keep, use_causal_mask=True)
    again = layer(x, x, value_mask=keep, use_causal_mask=True)  # same tensor: the cached plan
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    del keep
    for lengths in ([3, 16, 8], [16, 16, 1]):  # new tensors (maybe at a freed address): new plans
        other = _right(lengths)
        got = layer(x, x, value_mask=other, use_causal_mask=True)
        ref = MultiHeadAttention(4, 4, query_shape=E, attention_backend="math", dtype=torch.float64)
        ref.set_weights(layer.get_weights())
        torch.testing.assert_close(got, ref(x, x, value_mask=other, use_causal_mask=True), rtol=0, atol=1e-12)
    other[0, 5:] = False  # an in-place change bumps the version: a new plan
    ref = MultiHeadAttention(4, 4, query_shape=E, attention_backend="math", dtype=torch.float64)
    ref.set_weights(layer.get_weights())
    torch.testing.assert_close(layer(x, x, value_mask=other, use_causal_mask=True),
                               ref(x, x, value_mask=other, use_causal_mask=True), rtol=0, atol=1e-12)


def test_causal_pair_count_closed_form_matches_counting():
    import itertools

    from dist_mha.attention.kernels.varlen import Sequence, _pairs

    for lq, lk, q0, k0 in itertools.product((1, 5, 16), (1, 7, 16), (0, 3, 9), (0, 2, 12)):
        seq = Sequence(0, q0, q0 + lq, k0, k0 + lk)
        assert _pairs(seq, True) == sum(max(0, min(lk, i + q0 - k0 + 1)) for i in range(lq))
        assert _pairs(seq, False) == lq * lk

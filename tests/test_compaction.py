"""Padded tokens that no query attends to and that get no context are not projected at all.

Self-attention with the same query and key padding (Keras masks or negative
segment ids): the projections and the output projection run on the valid
rows only, and the result equals the uncompacted call's (float64, values and
gradients, 1e-12), including the output bias on padded rows.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_mha import GroupQueryAttention, MultiHeadAttention
from dist_mha.engine import compaction

B, T, E = 3, 16, 16
VALID = torch.zeros(B, T, dtype=torch.bool)
VALID[0, :16], VALID[1, :7], VALID[2, 4:12] = True, True, True
SEG = torch.tensor([[0] * 6 + [1] * 10, [4] * 7 + [-1] * 9, [-1] * 4 + [2] * 8 + [-1] * 4])


def _run(layer_fn, **call_kwargs):
    torch.manual_seed(0)
    layer = layer_fn()
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    out = layer(x, x, **call_kwargs)
    out.square().sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in layer.weights]


LAYERS = {
    "mha": lambda: MultiHeadAttention(4, 4, query_shape=E, dtype=torch.float64, use_gate=True, output_shape=(2, 5)),
    "gqa": lambda: GroupQueryAttention(4, 4, 1, query_shape=E, dtype=torch.float64, sliding_window=5),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("causal", [False, True])
def test_compacted_masks_equal_the_dense_equivalent(kind, causal):
    compact = _run(LAYERS[kind], query_mask=VALID, value_mask=VALID, use_causal_mask=causal)
    dense = _run(LAYERS[kind], attention_mask=VALID[:, :, None] & VALID[:, None, :], use_causal_mask=causal)
    for a, b in zip(compact, dense):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_compacted_segments_equal_the_uncompacted_call(monkeypatch):
    compact = _run(LAYERS["mha"], segment_ids=SEG, use_causal_mask=True)
    monkeypatch.setattr(compaction, "MIN_PADDING", 2.0)  # never compact
    full = _run(LAYERS["mha"], segment_ids=SEG, use_causal_mask=True)
    for a, b in zip(compact, full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


class _GemmRows(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.rows.append(out.shape[0])
        return out


def test_projection_gemms_run_on_the_valid_rows_only():
    layer = MultiHeadAttention(4, 4, query_shape=E, use_gate=True)
    x = torch.randn(B, T, E)
    with _GemmRows() as spy:
        layer(x, x, query_mask=VALID, value_mask=VALID)
    valid = int(VALID.sum())
    assert spy.rows and set(spy.rows) == {valid}, spy.rows  # q, k, gate, v and the output: 31 of 48 rows
    with _GemmRows() as spy:
        layer(x, x, value_mask=VALID)  # padded queries still get a context: everything is projected
    assert set(spy.rows) == {B * T}


@pytest.mark.parametrize("why", ["activity_regularizer", "cross", "different_masks", "scores"])
def test_no_compaction_where_semantics_need_every_row(why):
    kwargs = {"activity_regularizer": "l2"} if why == "activity_regularizer" else {}
    layer = MultiHeadAttention(4, 4, query_shape=E, **kwargs)
    x = torch.randn(B, T, E)
    y = torch.randn(B, T, E) if why == "cross" else x
    call_kwargs = dict(query_mask=VALID, value_mask=VALID if why != "different_masks" else ~VALID | VALID[:1])
    if why == "scores":
        call_kwargs["return_attention_scores"] = True
    with _GemmRows() as spy:
        layer(x, y, **call_kwargs)
    assert B * T in spy.rows

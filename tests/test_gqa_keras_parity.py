"""dist_mha's GroupQueryAttention vs real Keras 3 (torch backend), weights copied through get/set_weights.

Eight query heads with 1, 2, 4 and 8 key/value heads (multi-query, grouped,
half, and multi-head attention), on the default backend (SDPA with grouped
K/V read in place) and the exact math path. Tolerance as in
test_keras_parity.py: float32 outputs to 1e-5. Rows whose every key is
masked follow dist_mha's documented convention (zero context) and are
compared to the output bias instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keras_oracle import keras, keras_call, make_pair

RNG = np.random.default_rng(1)
B, T, S, NQ, H = 2, 5, 7, 8, 3
KV_HEADS = [1, 2, 4, 8]


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def keep_mask(*shape, p=0.7):
    m = RNG.random(shape) < p
    m[..., 0] = True
    return m


# (id, extra layer kwargs, query shape, value shape, key shape or None, call kwargs builder)
CASES = [
    ("self", {}, (B, T, 8), None, None, {}),
    ("cross_T_ne_S", {}, (B, T, 8), (B, S, 6), None, {}),
    ("separate_key", {}, (B, T, 8), (B, S, 6), (B, S, 5), {}),
    ("no_bias", dict(use_bias=False), (B, T, 8), (B, S, 8), None, {}),
    ("gate", dict(use_gate=True), (B, T, 8), (B, S, 8), None, {}),
    ("query_mask", {}, (B, T, 8), (B, S, 8), None, lambda: dict(query_mask=keep_mask(B, T))),
    ("value_mask", {}, (B, T, 8), (B, S, 8), None, lambda: dict(value_mask=keep_mask(B, S))),
    ("key_mask", {}, (B, T, 8), (B, S, 8), (B, S, 4), lambda: dict(key_mask=keep_mask(B, S))),
    ("attention_mask_BTS", {}, (B, T, 8), (B, S, 8), None, lambda: dict(attention_mask=keep_mask(B, T, S))),
    ("attention_mask_TS", {}, (B, T, 8), (B, S, 8), None, lambda: dict(attention_mask=keep_mask(T, S))),
    ("attention_mask_per_head", {}, (B, T, 8), (B, S, 8), None, lambda: dict(attention_mask=keep_mask(B, NQ, T, S))),
    ("attention_mask_float", {}, (B, T, 8), (B, S, 8), None,
     lambda: dict(attention_mask=keep_mask(B, T, S).astype(np.float32))),
    ("all_masks", {}, (B, T, 8), (B, S, 8), (B, S, 8), lambda: dict(
        query_mask=keep_mask(B, T), value_mask=keep_mask(B, S), key_mask=keep_mask(B, S),
        attention_mask=keep_mask(B, T, S))),
    ("causal_self", {}, (B, T, 8), None, None, lambda: dict(use_causal_mask=True)),
    ("causal_T_lt_S", {}, (B, T, 8), (B, S, 8), None, lambda: dict(use_causal_mask=True)),
    ("causal_T_gt_S", {}, (B, S, 8), (B, T, 8), None, lambda: dict(use_causal_mask=True)),
    ("causal_value_mask", {}, (B, T, 8), (B, S, 8), None, lambda: dict(use_causal_mask=True, value_mask=keep_mask(B, S))),
    ("causal_attention_mask", {}, (B, T, 8), None, None,
     lambda: dict(use_causal_mask=True, attention_mask=keep_mask(B, T, T))),
    ("window", dict(sliding_window=2), (B, T, 8), None, None, {}),
    ("window_causal", dict(sliding_window=3), (B, T, 8), None, None, lambda: dict(use_causal_mask=True)),
    ("window_cross_gate", dict(sliding_window=3, use_gate=True), (B, T, 8), (B, S, 6), None,
     lambda: dict(value_mask=keep_mask(B, S))),
    ("scores_self", {}, (B, T, 8), None, None, lambda: dict(return_attention_scores=True)),
    ("scores_masked", {}, (B, T, 8), (B, S, 8), None,
     lambda: dict(return_attention_scores=True, value_mask=keep_mask(B, S), use_causal_mask=True)),
    ("scores_window", dict(sliding_window=2), (B, T, 8), (B, S, 8), None, lambda: dict(return_attention_scores=True)),
    ("dropout_inference", dict(dropout=0.5), (B, T, 8), None, None, lambda: dict(training=False)),
]


def _fully_masked_rows(call_kwargs, out_shape):
    qm = call_kwargs.get("query_mask")
    rows = np.zeros(out_shape, bool)
    if qm is not None:
        rows |= ~np.asarray(qm, bool)[..., None]
    return rows


def _torch(call_kwargs):
    return {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in call_kwargs.items()}


@pytest.mark.parametrize("backend", [None, "math"])
@pytest.mark.parametrize("nkv", KV_HEADS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_group_query_attention_matches_keras(case, nkv, backend):
    _, extra, qs, vs, ks, call = case
    vs = vs or qs
    kwargs = dict(head_dim=H, num_query_heads=NQ, num_key_value_heads=nkv, **extra)
    call_kwargs = call() if callable(call) else dict(call)
    k_layer, ours = make_pair(kwargs, qs, vs, ks, layer="GroupQueryAttention", attention_backend=backend)
    query = rand(*qs)
    value = rand(*vs) if vs is not qs else query
    key = rand(*ks) if ks else None
    expected = keras_call(k_layer, query, value, key, **call_kwargs)
    got = ours(torch.from_numpy(query), torch.from_numpy(value), None if key is None else torch.from_numpy(key),
               **_torch(call_kwargs))
    if call_kwargs.get("return_attention_scores"):
        (expected, expected_scores), (got, got_scores) = expected, got
        assert got_scores.shape == expected_scores.shape == (qs[0], NQ, qs[1], vs[1])
        np.testing.assert_allclose(got_scores.detach().numpy(), expected_scores, rtol=1e-5, atol=1e-5)
    assert tuple(got.shape) == expected.shape
    got = got.detach().numpy()
    differ = _fully_masked_rows(call_kwargs, got.shape)
    np.testing.assert_allclose(np.where(differ, 0, got), np.where(differ, 0, expected), rtol=1e-5, atol=1e-5)
    if differ.any():
        bias = ours._modules["attention_output"].bias.detach().numpy()
        rows = got[differ.all(axis=-1)]
        np.testing.assert_allclose(rows, np.broadcast_to(bias, rows.shape), atol=1e-6)


@pytest.mark.parametrize("nkv", KV_HEADS)
def test_input_gradients_match_keras(nkv):
    kwargs = dict(head_dim=H, num_query_heads=NQ, num_key_value_heads=nkv, use_gate=True, sliding_window=4)
    k_layer, ours = make_pair(kwargs, (B, T, 6), (B, S, 6), (B, S, 5), layer="GroupQueryAttention")
    query, value, key = rand(B, T, 6), rand(B, S, 6), rand(B, S, 5)
    mask = keep_mask(B, S)
    grads = []
    for layer in (k_layer, ours):
        q, v, k = (torch.from_numpy(a).requires_grad_() for a in (query, value, key))
        out = layer(q, v, k, value_mask=torch.from_numpy(mask), use_causal_mask=True)
        (out ** 2).sum().backward()
        grads.append([t.grad.numpy() for t in (q, v, k)])
    for got, expected in zip(grads[1], grads[0]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nkv", KV_HEADS)
@pytest.mark.parametrize("use_bias,use_gate", [(True, False), (True, True), (False, True)])
def test_weight_order_and_shapes_match_keras(nkv, use_bias, use_gate):
    kwargs = dict(head_dim=H, num_query_heads=NQ, num_key_value_heads=nkv, use_bias=use_bias, use_gate=use_gate)
    k_layer, ours = make_pair(kwargs, (B, T, 6), (B, S, 5), (B, S, 9), layer="GroupQueryAttention")
    k_weights, our_weights = k_layer.get_weights(), ours.get_weights()
    assert [w.shape for w in our_weights] == [w.shape for w in k_weights]
    # The order the issue spells out: query, key, [gate], value, output.
    expected = [(6, NQ, H), (NQ, H), (9, nkv, H), (nkv, H)]
    expected += [(6, NQ, H), (NQ, H)] if use_gate else []
    expected += [(5, nkv, H), (nkv, H), (NQ, H, 6), (6,)]
    if not use_bias:
        expected = [s for s in expected if len(s) == 3]
    assert [w.shape for w in our_weights] == expected
    for a, b in zip(our_weights, k_weights):
        np.testing.assert_array_equal(a, b)


def test_config_round_trips_through_keras_both_ways():
    from dist_mha import GroupQueryAttention

    k = keras()
    kwargs = dict(
        head_dim=4, num_query_heads=6, num_key_value_heads=2, dropout=0.25, use_bias=False, sliding_window=3,
        kernel_initializer="he_normal", bias_initializer="ones", kernel_regularizer="l2",
        bias_regularizer=k.regularizers.L1(0.5), activity_regularizer=k.regularizers.L1L2(l1=0.01, l2=0.02),
        kernel_constraint="max_norm", bias_constraint=k.constraints.NonNeg(), use_gate=True, seed=7, name="gqa",
    )
    k_cfg = k.layers.GroupQueryAttention(**kwargs).get_config()
    ours = GroupQueryAttention.from_config(k_cfg)
    assert ours.get_config() == k_cfg
    assert k.layers.GroupQueryAttention.from_config(ours.get_config()).get_config() == k_cfg
    assert GroupQueryAttention.from_config(ours.get_config()).get_config() == ours.get_config()


@pytest.mark.parametrize("shapes", [((B, T, 8), (B, S, 8), None), ((None, None, 8), (None, 4, 8), (None, 4, 3))])
def test_compute_output_shape_matches_keras_unbuilt(shapes):
    from dist_mha import GroupQueryAttention

    k = keras()
    kwargs = dict(head_dim=4, num_query_heads=4, num_key_value_heads=2)
    expected = k.layers.GroupQueryAttention(**kwargs).compute_output_shape(*shapes)
    assert GroupQueryAttention(**kwargs).compute_output_shape(*shapes) == tuple(expected)


def test_losses_match_keras():
    k = keras()
    kwargs = dict(head_dim=3, num_query_heads=4, num_key_value_heads=2, kernel_regularizer="l2",
                  bias_regularizer=k.regularizers.L1(0.3), activity_regularizer=k.regularizers.L1L2(l1=0.1, l2=0.2),
                  bias_initializer="random_normal", use_gate=True)
    k_layer, ours = make_pair(kwargs, (B, T, 5), (B, S, 7), layer="GroupQueryAttention")
    query, value = rand(B, T, 5), rand(B, S, 7)
    k_layer(torch.from_numpy(query), torch.from_numpy(value))
    ours(torch.from_numpy(query), torch.from_numpy(value))
    expected = [float(x) for x in k_layer.losses]
    got = [float(x.detach()) for x in ours.losses]
    assert len(got) == len(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_losses_with_returned_scores_match_keras():
    # Keras's GQA regularises everything it returns, the scores included.
    k = keras()
    kwargs = dict(head_dim=3, num_query_heads=4, num_key_value_heads=1, activity_regularizer=k.regularizers.L2(0.1))
    k_layer, ours = make_pair(kwargs, (B, T, 5), (B, S, 5), layer="GroupQueryAttention")
    query, value = rand(B, T, 5), rand(B, S, 5)
    k_layer(torch.from_numpy(query), torch.from_numpy(value), return_attention_scores=True)
    ours(torch.from_numpy(query), torch.from_numpy(value), return_attention_scores=True)
    expected = [float(x.detach()) for x in k_layer.losses]
    got = [float(x.detach()) for x in ours.losses]
    assert len(got) == len(expected) == 6  # output and scores, then query, key, value, output sublayers
    np.testing.assert_allclose(got, expected, rtol=1e-5)

"""dist_mha vs real Keras 3 (torch backend), weights copied through get/set_weights.

Tolerance: float32 outputs agree to 1e-5 (both sides run the same float32
ops in a different order; observed differences are ~1e-7).

Rows whose every key is masked are compared separately: Keras makes them a
uniform average over all keys (its -1e9 fill), dist_mha makes them zero, its
documented convention.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keras_oracle import keras_call, make_pair

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def keep_mask(*shape, p=0.7):
    m = RNG.random(shape) < p
    m[..., 0] = True  # every row keeps one key: no fully masked rows here
    return m


B, T, S = 2, 5, 7
# (id, layer kwargs, query shape, value shape, key shape or None, call kwargs builder)
CASES = [
    ("self", dict(num_heads=2, key_dim=4), (B, T, 8), None, None, {}),
    ("cross_T_ne_S", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), None, {}),
    ("Dq_ne_Dv", dict(num_heads=3, key_dim=4), (B, T, 6), (B, S, 10), None, {}),
    ("key_ne_value", dict(num_heads=2, key_dim=4), (B, T, 6), (B, S, 10), (B, S, 3), {}),
    ("value_dim", dict(num_heads=2, key_dim=4, value_dim=5), (B, T, 8), (B, S, 6), None, {}),
    ("no_bias", dict(num_heads=2, key_dim=4, use_bias=False), (B, T, 8), (B, S, 8), None, {}),
    ("output_shape_int", dict(num_heads=2, key_dim=4, output_shape=9), (B, T, 8), (B, S, 8), None, {}),
    ("output_shape_tuple", dict(num_heads=2, key_dim=4, output_shape=(3, 4)), (B, T, 8), (B, S, 8), None, {}),
    ("axes_4d_2", dict(num_heads=2, key_dim=4, attention_axes=(2,)), (B, 3, T, 8), (B, 3, S, 8), None, {}),
    ("axes_4d_neg2", dict(num_heads=2, key_dim=4, attention_axes=-2), (B, 3, T, 8), (B, 3, S, 8), None, {}),
    ("axes_4d_1", dict(num_heads=2, key_dim=4, attention_axes=(1,)), (B, T, 3, 8), (B, S, 3, 8), None, {}),
    ("axes_4d_12", dict(num_heads=2, key_dim=4, attention_axes=(1, 2)), (B, 3, 4, 8), (B, 2, 5, 8), None, {}),
    ("axes_4d_21", dict(num_heads=2, key_dim=4, attention_axes=(2, 1)), (B, 3, 4, 8), (B, 2, 5, 8), None, {}),
    ("axes_5d_23", dict(num_heads=2, key_dim=4, attention_axes=(2, 3)), (B, 2, 3, 4, 8), (B, 2, 2, 5, 6), None, {}),
    ("axes_5d_neg", dict(num_heads=2, key_dim=4, attention_axes=(-4, -2)), (B, 3, 2, 4, 8), (B, 2, 2, 5, 8), None, {}),
    ("query_mask", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), None, lambda: dict(query_mask=keep_mask(B, T))),
    ("value_mask", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), None, lambda: dict(value_mask=keep_mask(B, S))),
    ("key_mask", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), (B, S, 5), lambda: dict(key_mask=keep_mask(B, S))),
    ("attention_mask_BTS", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), None, lambda: dict(attention_mask=keep_mask(B, T, S))),
    ("attention_mask_TS", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), None, lambda: dict(attention_mask=keep_mask(T, S))),
    ("attention_mask_BNTS", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), None, lambda: dict(attention_mask=keep_mask(B, 2, T, S))),
    ("attention_mask_float", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), None, lambda: dict(attention_mask=keep_mask(B, T, S).astype(np.float32))),
    ("all_masks", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), (B, S, 8), lambda: dict(query_mask=keep_mask(B, T), value_mask=keep_mask(B, S), key_mask=np.ones((B, S), bool), attention_mask=keep_mask(B, T, S))),
    ("causal_self", dict(num_heads=2, key_dim=4), (B, T, 8), None, None, lambda: dict(use_causal_mask=True)),
    ("causal_T_lt_S", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), None, lambda: dict(use_causal_mask=True)),
    ("causal_T_gt_S", dict(num_heads=2, key_dim=4), (B, S, 8), (B, T, 8), None, lambda: dict(use_causal_mask=True)),
    ("causal_value_mask", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), None, lambda: dict(use_causal_mask=True, value_mask=keep_mask(B, S))),
    ("causal_attention_mask", dict(num_heads=2, key_dim=4), (B, T, 8), None, None, lambda: dict(use_causal_mask=True, attention_mask=keep_mask(B, T, T))),
    ("causal_4d_axis1", dict(num_heads=2, key_dim=4, attention_axes=1), (B, T, 3, 8), None, None, lambda: dict(use_causal_mask=True)),
    ("mask_4d", dict(num_heads=2, key_dim=4, attention_axes=(2,)), (B, 3, T, 8), (B, 3, S, 8), None, lambda: dict(attention_mask=keep_mask(B, 3, T, S), value_mask=keep_mask(B, 3, S))),
    ("scores_self", dict(num_heads=2, key_dim=4), (B, T, 8), None, None, lambda: dict(return_attention_scores=True)),
    ("scores_masked", dict(num_heads=2, key_dim=4), (B, T, 8), (B, S, 8), None, lambda: dict(return_attention_scores=True, value_mask=keep_mask(B, S), use_causal_mask=True)),
    ("scores_4d", dict(num_heads=2, key_dim=4, attention_axes=(2,)), (B, 3, T, 8), (B, 3, S, 8), None, lambda: dict(return_attention_scores=True)),
    ("scores_5d_multi", dict(num_heads=2, key_dim=4, attention_axes=(1, 3)), (B, 2, 3, 4, 8), (B, 3, 3, 2, 8), None, lambda: dict(return_attention_scores=True)),
    ("sliding_window", dict(num_heads=2, key_dim=4, sliding_window=2), (B, T, 8), None, None, lambda: dict(use_causal_mask=True)),
    ("use_gate", dict(num_heads=2, key_dim=4, use_gate=True, value_dim=3), (B, T, 8), (B, S, 8), None, {}),
    ("dropout_inference", dict(num_heads=2, key_dim=4, dropout=0.5), (B, T, 8), None, None, lambda: dict(training=False)),
]


def _fully_masked_rows(call_kwargs, out_shape):
    """Bool array over the output rows `(B, d..)` where Keras and dist_mha conventions differ."""
    qm = call_kwargs.get("query_mask")
    rows = np.zeros(out_shape, bool)
    if qm is not None:
        rows |= ~np.asarray(qm, bool).reshape(qm.shape + (1,) * (len(out_shape) - qm.ndim))
    return rows


@pytest.mark.parametrize("backend", [None, "math"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_keras(case, backend):
    _, layer_kwargs, qs, vs, ks, call = case
    vs = vs or qs
    call_kwargs = call() if callable(call) else dict(call)
    k_layer, ours = make_pair(layer_kwargs, qs, vs, ks, attention_backend=backend)
    query, value = rand(*qs), (rand(*vs) if vs is not qs else None)
    key = rand(*ks) if ks else None
    value_in = value if value is not None else query
    expected = keras_call(k_layer, query, value_in, key, **call_kwargs)
    got = ours(
        torch.from_numpy(query), torch.from_numpy(value_in), None if key is None else torch.from_numpy(key),
        **{k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in call_kwargs.items()},
    )
    if call_kwargs.get("return_attention_scores"):
        (expected, expected_scores), (got, got_scores) = expected, got
        assert got_scores.shape == expected_scores.shape
        np.testing.assert_allclose(got_scores.detach().numpy(), expected_scores, rtol=1e-5, atol=1e-5)
    assert tuple(got.shape) == expected.shape
    got = got.detach().numpy()
    differ = _fully_masked_rows(call_kwargs, got.shape)
    np.testing.assert_allclose(np.where(differ, 0, got), np.where(differ, 0, expected), rtol=1e-5, atol=1e-5)
    if differ.any():
        # Our convention on those rows: zero context, so the output is the bias.
        bias = ours.output_dense.bias.detach().numpy()
        np.testing.assert_allclose(got[differ.all(axis=-1)], np.broadcast_to(bias, got[differ.all(axis=-1)].shape), atol=1e-6)


def test_input_gradients_match_keras():
    k_layer, ours = make_pair(dict(num_heads=2, key_dim=4, output_shape=(3, 2)), (B, T, 6), (B, S, 5))
    query, value = rand(B, T, 6), rand(B, S, 5)
    mask = keep_mask(B, S)
    grads = []
    for fn in (lambda q, v: k_layer(q, v, value_mask=torch.from_numpy(mask), use_causal_mask=True),
               lambda q, v: ours(q, v, value_mask=torch.from_numpy(mask), use_causal_mask=True)):
        q = torch.from_numpy(query).requires_grad_()
        v = torch.from_numpy(value).requires_grad_()
        (fn(q, v) ** 2).sum().backward()
        grads.append((q.grad.numpy(), v.grad.numpy()))
    np.testing.assert_allclose(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-5)


def test_weight_shapes_and_order_match_keras():
    for kwargs in (dict(num_heads=3, key_dim=4, value_dim=5, output_shape=(2, 7)),
                   dict(num_heads=2, key_dim=4, use_bias=False, use_gate=True)):
        k_layer, ours = make_pair(kwargs, (B, T, 6), (B, S, 5), (B, S, 9))
        assert [w.shape for w in ours.get_weights()] == [w.shape for w in k_layer.get_weights()]
        for a, b in zip(ours.get_weights(), k_layer.get_weights()):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(num_heads=2, key_dim=4), dict(num_heads=2, key_dim=4, output_shape=(3, 5)), dict(num_heads=2, key_dim=4, attention_axes=(2,))])
@pytest.mark.parametrize("shapes", [((B, T, 8), (B, S, 6), None), ((None, None, 8), (None, 4, 6), (None, 4, 3)), ((B, 3, T, 8), (B, 3, S, 6), None)])
def test_compute_output_shape_matches_keras_unbuilt(kwargs, shapes):
    from dist_mha import MultiHeadAttention
    from keras_oracle import keras

    k = keras()
    expected = k.layers.MultiHeadAttention(**kwargs).compute_output_shape(*shapes)
    assert MultiHeadAttention(**kwargs).compute_output_shape(*shapes) == tuple(expected)


def test_config_round_trips_through_keras():
    from dist_mha import MultiHeadAttention
    from keras_oracle import keras

    k = keras()
    kwargs = dict(
        num_heads=3, key_dim=4, value_dim=6, dropout=0.25, use_bias=False, output_shape=(2, 3),
        attention_axes=(1,), sliding_window=3, kernel_initializer="he_normal", bias_initializer="ones",
        kernel_regularizer="l2", bias_regularizer=k.regularizers.L1(0.5), activity_regularizer=k.regularizers.L1L2(l1=0.01, l2=0.02),
        kernel_constraint="max_norm", bias_constraint=k.constraints.NonNeg(), use_gate=True, seed=7, name="mha",
    )
    k_cfg = k.layers.MultiHeadAttention(**kwargs).get_config()
    ours = MultiHeadAttention.from_config(k_cfg)
    assert set(ours.get_config()) == set(k_cfg)
    # Our config must rebuild an identical Keras layer, and vice versa.
    back = k.layers.MultiHeadAttention.from_config(ours.get_config()).get_config()
    assert back == k_cfg
    assert MultiHeadAttention.from_config(ours.get_config()).get_config() == ours.get_config()


def test_losses_match_keras():
    from keras_oracle import keras

    k = keras()
    kwargs = dict(num_heads=2, key_dim=3, kernel_regularizer="l2", bias_regularizer=k.regularizers.L1(0.3),
                  activity_regularizer=k.regularizers.L1L2(l1=0.1, l2=0.2), bias_initializer="random_normal", use_gate=True)
    k_layer, ours = make_pair(kwargs, (B, T, 5), (B, S, 7))
    query, value = rand(B, T, 5), rand(B, S, 7)
    k_layer(torch.from_numpy(query), torch.from_numpy(value))
    ours(torch.from_numpy(query), torch.from_numpy(value))
    expected = [float(x) for x in k_layer.losses]
    got = [float(x) for x in ours.losses]
    assert len(got) == len(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert all(x.requires_grad for x in ours.losses)

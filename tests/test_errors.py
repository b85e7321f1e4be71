"""Every row of README.md's "Errors" table: invalid arguments and inputs raise
ValueError naming the argument and the value received; valid neighbours pass.

Each regex checks two things independently (lookaheads, any order): the
argument's name and the received value (its repr, or the offending shape).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dist_mha import MultiHeadAttention

B, T, S, D = 2, 3, 5, 8


def names_and_value(*parts: str) -> str:
    """Regex matching a message that contains every literal in `parts`, in any order."""
    return "(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in parts)


def built(**kwargs):
    """A layer built for rank-3 inputs with D features everywhere."""
    return MultiHeadAttention(num_heads=2, key_dim=4, query_shape=(None, None, D), **kwargs)


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, D, generator=g), torch.randn(B, S, D, generator=g)


# --------------------------------------------------------------------------------------
# constructor arguments
# --------------------------------------------------------------------------------------
_OBJ = object()

INVALID_CONSTRUCTOR = [
    # (id, kwargs beyond num_heads/key_dim, argument name, value text in message)
    ("num_heads_zero", dict(num_heads=0), "num_heads", "num_heads=0"),
    ("num_heads_negative", dict(num_heads=-1), "num_heads", "num_heads=-1"),
    ("num_heads_float", dict(num_heads=2.5), "num_heads", "num_heads=2.5"),
    ("num_heads_bool", dict(num_heads=True), "num_heads", "num_heads=True"),
    ("num_heads_str", dict(num_heads="4"), "num_heads", "num_heads='4'"),
    ("num_heads_none", dict(num_heads=None), "num_heads", "num_heads=None"),
    ("key_dim_zero", dict(key_dim=0), "key_dim", "key_dim=0"),
    ("key_dim_negative", dict(key_dim=-3), "key_dim", "key_dim=-3"),
    ("key_dim_float", dict(key_dim=4.0), "key_dim", "key_dim=4.0"),
    ("key_dim_bool", dict(key_dim=False), "key_dim", "key_dim=False"),
    ("key_dim_none", dict(key_dim=None), "key_dim", "key_dim=None"),
    ("value_dim_zero", dict(value_dim=0), "value_dim", "value_dim=0"),
    ("value_dim_negative", dict(value_dim=-1), "value_dim", "value_dim=-1"),
    ("value_dim_float", dict(value_dim=1.5), "value_dim", "value_dim=1.5"),
    ("value_dim_str", dict(value_dim="8"), "value_dim", "value_dim='8'"),
    ("dropout_negative", dict(dropout=-0.1), "dropout", "dropout=-0.1"),
    ("dropout_one", dict(dropout=1.0), "dropout", "dropout=1.0"),
    ("dropout_above_one", dict(dropout=1.5), "dropout", "dropout=1.5"),
    ("dropout_str", dict(dropout="x"), "dropout", "dropout='x'"),
    ("dropout_bool", dict(dropout=True), "dropout", "dropout=True"),
    ("use_bias_str", dict(use_bias="yes"), "use_bias", "use_bias='yes'"),
    ("use_bias_int", dict(use_bias=1), "use_bias", "use_bias=1"),
    ("use_gate_str", dict(use_gate="no"), "use_gate", "use_gate='no'"),
    ("trainable_int", dict(trainable=0), "trainable", "trainable=0"),
    ("output_shape_zero", dict(output_shape=0), "output_shape", "output_shape=0"),
    ("output_shape_tuple_zero", dict(output_shape=(3, 0)), "output_shape", "output_shape=(3, 0)"),
    ("output_shape_negative", dict(output_shape=(-2,)), "output_shape", "output_shape=(-2,)"),
    ("output_shape_str", dict(output_shape="ab"), "output_shape", "output_shape='ab'"),
    ("output_shape_empty", dict(output_shape=()), "output_shape", "output_shape=()"),
    ("output_shape_float", dict(output_shape=(2.0,)), "output_shape", "output_shape=(2.0,)"),
    ("attention_axes_str", dict(attention_axes="x"), "attention_axes", "attention_axes='x'"),
    ("attention_axes_float", dict(attention_axes=(1.5,)), "attention_axes", "attention_axes=(1.5,)"),
    ("attention_axes_empty", dict(attention_axes=()), "attention_axes", "attention_axes=()"),
    ("attention_axes_bool", dict(attention_axes=True), "attention_axes", "attention_axes=True"),
    ("sliding_window_zero", dict(sliding_window=0), "sliding_window", "sliding_window=0"),
    ("sliding_window_negative", dict(sliding_window=-4), "sliding_window", "sliding_window=-4"),
    ("sliding_window_float", dict(sliding_window=2.0), "sliding_window", "sliding_window=2.0"),
    ("flash_attention_auto", dict(flash_attention="auto"), "flash_attention", "flash_attention='auto'"),
    ("flash_attention_int", dict(flash_attention=1), "flash_attention", "flash_attention=1"),
    ("seed_negative", dict(seed=-1), "seed", "seed=-1"),
    ("seed_float", dict(seed=1.5), "seed", "seed=1.5"),
    ("seed_str", dict(seed="3"), "seed", "seed='3'"),
    ("attention_backend_cuda", dict(attention_backend="cuda"), "attention_backend", "attention_backend='cuda'"),
    ("attention_backend_upper", dict(attention_backend="SDPA"), "attention_backend", "attention_backend='SDPA'"),
    ("dtype_int32", dict(dtype=torch.int32), "dtype", "torch.int32"),
    ("dtype_bool", dict(dtype=torch.bool), "dtype", "torch.bool"),
    ("dtype_int8_name", dict(dtype="int8"), "dtype", "dtype='int8'"),
    ("dtype_unknown_name", dict(dtype="float128"), "dtype", "dtype='float128'"),
    ("dtype_complex", dict(dtype=torch.complex64), "dtype", "torch.complex64"),
    ("dtype_int_value", dict(dtype=3), "dtype", "dtype=3"),
    ("dtype_policy_dict_int", dict(dtype={"class_name": "DTypePolicy", "config": {"name": "int32"}}), "dtype", "'int32'"),
    ("kernel_regularizer_int", dict(kernel_regularizer=5), "kernel_regularizer", "kernel_regularizer=5"),
    ("kernel_regularizer_bad_config", dict(kernel_regularizer={"class_name": "L2", "config": [1]}),
     "kernel_regularizer", "[1]"),
    ("kernel_initializer_unknown", dict(kernel_initializer="glorot_nope"), "kernel_initializer", "'glorot_nope'"),
    ("bias_initializer_unknown", dict(bias_initializer="zeroes"), "bias_initializer", "'zeroes'"),
    ("kernel_initializer_none", dict(kernel_initializer=None), "kernel_initializer", "kernel_initializer=None"),
    ("kernel_regularizer_unknown", dict(kernel_regularizer="l3"), "kernel_regularizer", "'l3'"),
    ("bias_regularizer_unknown", dict(bias_regularizer="ridge"), "bias_regularizer", "'ridge'"),
    ("activity_regularizer_unknown", dict(activity_regularizer="lasso"), "activity_regularizer", "'lasso'"),
    ("kernel_constraint_unknown", dict(kernel_constraint="nonneg_x"), "kernel_constraint", "'nonneg_x'"),
    ("bias_constraint_unknown", dict(bias_constraint="max_norms"), "bias_constraint", "'max_norms'"),
    ("kernel_initializer_dict_unknown", dict(kernel_initializer={"class_name": "Nope", "config": {}}),
     "kernel_initializer", "'Nope'"),
    ("tp_group_object", dict(tp_group=_OBJ), "tp_group", repr(_OBJ)),
    ("unknown_kwarg", dict(foo_bar=1), "foo_bar", "1"),
]


@pytest.mark.parametrize(
    "kwargs,arg,value", [c[1:] for c in INVALID_CONSTRUCTOR], ids=[c[0] for c in INVALID_CONSTRUCTOR]
)
def test_constructor_invalid_argument_raises_naming_argument_and_value(kwargs, arg, value):
    full = {"num_heads": 2, "key_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=names_and_value(arg, value)):
        MultiHeadAttention(**full)


def test_constructor_two_unknown_kwargs_lists_both():
    with pytest.raises(ValueError, match=names_and_value("alpha", "beta_arg")):
        MultiHeadAttention(num_heads=2, key_dim=4, alpha=1, beta_arg=2)


def test_constructor_value_shape_without_query_shape_raises():
    with pytest.raises(ValueError, match=names_and_value("value_shape", "query_shape")):
        MultiHeadAttention(num_heads=2, key_dim=4, value_shape=(None, None, D))


@pytest.mark.parametrize("name", ["mixed_foo", "mixed_int8"])
def test_constructor_unknown_mixed_policy_raises(name):
    with pytest.raises(ValueError, match=names_and_value("dtype", name)):
        MultiHeadAttention(num_heads=2, key_dim=4, dtype=name)


VALID_CONSTRUCTOR = [
    ("value_dim_none", dict(value_dim=None)),
    ("dropout_zero_int", dict(dropout=0)),
    ("dropout_just_below_one", dict(dropout=0.999)),
    ("output_shape_int", dict(output_shape=3)),
    ("output_shape_list", dict(output_shape=[3, 2])),
    ("attention_axes_int", dict(attention_axes=1)),
    ("attention_axes_negative", dict(attention_axes=(-2,))),
    ("sliding_window_one", dict(sliding_window=1)),
    ("flash_attention_false", dict(flash_attention=False)),
    ("flash_attention_true_unbuilt", dict(flash_attention=True)),
    ("seed_zero", dict(seed=0)),
    ("backend_math", dict(attention_backend="math")),
    ("backend_sdpa", dict(attention_backend="sdpa")),
    ("backend_flash", dict(attention_backend="flash")),
    ("dtype_name", dict(dtype="float64")),
    ("dtype_policy_mixed", dict(dtype="mixed_bfloat16")),
    ("dtype_torch", dict(dtype=torch.bfloat16)),
    ("initializer_dict", dict(kernel_initializer={"class_name": "GlorotNormal", "config": {"seed": 1}})),
    ("initializer_callable", dict(kernel_initializer=lambda shape, dtype=None: torch.zeros(shape, dtype=dtype))),
    ("regularizer_name", dict(kernel_regularizer="l2", bias_regularizer="L1")),
    ("constraint_name", dict(kernel_constraint="non_neg", bias_constraint="MaxNorm")),
    ("autocast_keras_flag", dict(autocast=False)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in VALID_CONSTRUCTOR], ids=[c[0] for c in VALID_CONSTRUCTOR])
def test_constructor_valid_argument_does_not_raise(kwargs):
    layer = MultiHeadAttention(num_heads=2, key_dim=4, **kwargs)
    assert layer.num_heads == 2 and not layer.built


# --------------------------------------------------------------------------------------
# attention_axes resolved at build
# --------------------------------------------------------------------------------------
INVALID_AXES_AT_BUILD = [
    # (id, attention_axes, query shape, text that must appear)
    ("batch_axis_zero", 0, (B, T, D), "0"),
    ("feature_axis_last", 2, (B, T, D), "2"),
    ("feature_axis_last_rank4", (3,), (B, 4, T, D), "3"),
    ("feature_axis_minus_one", -1, (B, T, D), "-1"),
    ("out_of_range", 5, (B, T, D), "5"),
    ("out_of_range_negative", -4, (B, T, D), "-4"),
    ("repeat_negative_form", (1, -2), (B, T, D), "-2"),
    ("repeat_literal", (2, 2), (B, 4, T, D), "2"),
]


@pytest.mark.parametrize(
    "axes,shape,value", [c[1:] for c in INVALID_AXES_AT_BUILD], ids=[c[0] for c in INVALID_AXES_AT_BUILD]
)
def test_build_invalid_attention_axes_raises_naming_axis(axes, shape, value):
    with pytest.raises(ValueError, match=names_and_value("attention_axes", f"axis {value}")):
        MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=axes, query_shape=shape)


@pytest.mark.parametrize("axes,shape", [(1, (B, T, D)), (-2, (B, T, D)), ((1, 2), (B, 4, T, D)), ((-2,), (B, 4, T, D))])
def test_build_valid_attention_axes_does_not_raise(axes, shape):
    layer = MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=axes, query_shape=shape)
    assert layer.built


def test_call_invalid_attention_axes_lazy_build_raises():
    layer = MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, -2))
    x, _ = inputs()
    with pytest.raises(ValueError, match=names_and_value("attention_axes", "axis -2")):
        layer(x, x)


# --------------------------------------------------------------------------------------
# build shapes
# --------------------------------------------------------------------------------------
INVALID_BUILD = [
    # (id, query_shape, value_shape, key_shape, texts)
    ("query_rank2", (B, D), None, None, ("query_shape", "(2, 8)")),
    ("query_feature_none", (B, T, None), None, None, ("query_shape", "(2, 3, None)")),
    ("query_feature_zero", (B, T, 0), None, None, ("query_shape", "(2, 3, 0)")),
    ("value_rank2", (B, T, D), (B, D), None, ("value_shape", "(2, 8)")),
    ("value_feature_none", (B, T, D), (B, S, None), None, ("value_shape", "(2, 5, None)")),
    ("key_feature_none", (B, T, D), (B, S, D), (B, S, None), ("key_shape", "(2, 5, None)")),
    ("value_key_mismatch", (B, T, D), (B, 4, D), (B, 5, D), ("value_shape=(2, 4, 8)", "key_shape=(2, 5, 8)")),
    ("query_value_rank_mismatch", (B, T, D), (B, 4, S, D), None, ("query_shape=(2, 3, 8)", "value_shape=(2, 4, 5, 8)")),
    ("negative_dim", (B, -1, D), None, None, ("query_shape", "(2, -1, 8)")),
]


@pytest.mark.parametrize(
    "query_shape,value_shape,key_shape,texts", [c[1:] for c in INVALID_BUILD], ids=[c[0] for c in INVALID_BUILD]
)
def test_build_invalid_shape_raises_naming_shape(query_shape, value_shape, key_shape, texts):
    with pytest.raises(ValueError, match=names_and_value(*texts)):
        MultiHeadAttention(
            num_heads=2, key_dim=4, query_shape=query_shape, value_shape=value_shape, key_shape=key_shape
        )
    # The same through build() on an unbuilt layer.
    layer = MultiHeadAttention(num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match=names_and_value(*texts)):
        layer.build(query_shape, value_shape if value_shape is not None else query_shape, key_shape)
    assert not layer.built


@pytest.mark.parametrize(
    "query_shape,value_shape,key_shape",
    [
        ((None, None, D), (None, None, 6), (None, None, 3)),
        (D, None, None),
        ((B, T, D), (B, S, D), (B, S, 5)),
        ((B, 2, T, D), (B, 2, S, D), None),
    ],
)
def test_build_valid_shape_does_not_raise(query_shape, value_shape, key_shape):
    layer = MultiHeadAttention(
        num_heads=2, key_dim=4, query_shape=query_shape, value_shape=value_shape, key_shape=key_shape
    )
    assert layer.built


def test_build_string_shape_message_contains_received_value():
    with pytest.raises(ValueError, match=names_and_value("query_shape", "'abc'")):
        MultiHeadAttention(num_heads=2, key_dim=4, query_shape="abc")


def test_build_string_shape_raises_naming_argument():
    with pytest.raises(ValueError, match="query_shape"):
        MultiHeadAttention(num_heads=2, key_dim=4, query_shape="abc")


def test_build_twice_raises_already_built():
    layer = built()
    with pytest.raises(ValueError, match=names_and_value("already built")):
        layer.build((None, None, D), (None, None, D))


def test_build_after_lazy_call_raises_already_built():
    layer = MultiHeadAttention(num_heads=2, key_dim=4)
    x, v = inputs()
    layer(x, v)
    with pytest.raises(ValueError, match="already built"):
        layer.build(tuple(x.shape), tuple(v.shape))


# --------------------------------------------------------------------------------------
# call inputs
# --------------------------------------------------------------------------------------
def _call_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g)
    v = torch.randn(B, S, D, generator=g)
    ones = lambda *s: torch.ones(*s, dtype=torch.bool)  # noqa: E731
    return [
        # (id, args, kwargs, texts)
        ("query_int32", (x.to(torch.int32), v), {}, ("query", "torch.int32")),
        ("query_int64_numpy", (np.ones((B, T, D), dtype=np.int64), v), {}, ("query", "int64")),
        ("value_bool", (x, v > 0), {}, ("value", "torch.bool")),
        ("key_int", (x, v), dict(key=v.to(torch.int16)), ("key", "torch.int16")),
        ("query_complex", (x.to(torch.complex64), v), {}, ("query", "complex64")),
        ("query_rank2", (x[0], v), {}, ("query", "(3, 8)")),
        ("value_rank2", (x, v[0]), {}, ("value", "(5, 8)")),
        ("key_rank1", (x, v), dict(key=v[0, 0]), ("key", "(8,)")),
        ("query_list", (x.tolist(), v), {}, ("query", "list")),
        ("value_list", (x, v.tolist()), {}, ("value", "list")),
        ("value_float64", (x, v.double()), {}, ("value", "torch.float64")),
        ("key_float16", (x, v), dict(key=v.half()), ("key", "torch.float16")),
        ("value_meta_device", (x, torch.empty(B, S, D, device="meta")), {}, ("value", "meta")),
        ("query_features", (torch.randn(B, T, 6), v), {}, ("query", "(2, 3, 6)")),
        ("value_features", (x, torch.randn(B, S, 6)), {}, ("value", "(2, 5, 6)")),
        ("key_features", (x, v), dict(key=torch.randn(B, S, 7)), ("key", "(2, 5, 7)")),
        ("query_rank4_after_build", (torch.randn(B, 4, T, D), torch.randn(B, 4, S, D)), {}, ("query", "(2, 4, 3, 8)")),
        ("value_rank4_after_build", (x, torch.randn(B, 4, S, D)), {}, ("value", "(2, 4, 5, 8)")),
        ("key_value_length_mismatch", (x, v), dict(key=torch.randn(B, 4, D)), ("key", "(2, 4, 8)", "(2, 5, 8)")),
        ("key_value_batch_mismatch", (x, v), dict(key=torch.randn(3, S, D)), ("key", "(3, 5, 8)")),
        ("query_value_batch_mismatch", (x, torch.randn(3, S, D)), {}, ("value", "(3, 5, 8)", "(2, 3, 8)")),
        ("query_mask_wrong_length", (x, v), dict(query_mask=ones(B, S)), ("query_mask", "(2, 5)")),
        ("query_mask_with_features", (x, v), dict(query_mask=ones(B, T, D)), ("query_mask", "(2, 3, 8)")),
        ("query_mask_not_array", (x, v), dict(query_mask="abc"), ("query_mask", "query_mask='abc'")),
        ("value_mask_wrong_length", (x, v), dict(value_mask=ones(B, T)), ("value_mask", "(2, 3)")),
        ("value_mask_wrong_batch", (x, v), dict(value_mask=ones(1, S)), ("value_mask", "(1, 5)")),
        ("key_mask_wrong_length", (x, v), dict(key_mask=ones(B, 4)), ("key_mask", "(2, 4)")),
        ("key_mask_rank1", (x, v), dict(key_mask=ones(S)), ("key_mask", "(5,)")),
        ("attention_mask_rank5", (x, v), dict(attention_mask=ones(1, B, 2, T, S)), ("attention_mask", "(1, 2, 2, 3, 5)")),
        ("return_attention_scores_str", (x, v), dict(return_attention_scores="yes"),
         ("return_attention_scores", "'yes'")),
        ("use_causal_mask_int", (x, v), dict(use_causal_mask=1), ("use_causal_mask", "use_causal_mask=1")),
        ("training_str", (x, v), dict(training="train"), ("training", "'train'")),
        ("training_int", (x, v), dict(training=0), ("training", "training=0")),
    ]


CALL_CASES = _call_cases()


@pytest.mark.parametrize("args,kwargs,texts", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES])
def test_call_invalid_input_raises_naming_input_and_value(args, kwargs, texts):
    layer = built()
    with pytest.raises(ValueError, match=names_and_value(*texts)):
        layer(*args, **kwargs)


@pytest.mark.parametrize("which", ["query", "value"])
def test_call_none_query_or_value_raises_value_error(which):
    layer = built()
    x, v = inputs()
    args = dict(query=x, value=v)
    args[which] = None
    with pytest.raises(ValueError, match=names_and_value(which, "None")):
        layer(**args)


# attention_mask shapes that do not broadcast to the scores (B, N, T, S) = (2, 2, 3, 5).
NON_BROADCASTABLE_ATTENTION_MASKS = [
    ("wrong_S", (B, T, 4)),
    ("wrong_batch", (3, T, S)),
    ("wrong_T", (B, 4, S)),
    ("wrong_heads_rank4", (B, 3, T, S)),
]


@pytest.mark.parametrize(
    "shape", [c[1] for c in NON_BROADCASTABLE_ATTENTION_MASKS], ids=[c[0] for c in NON_BROADCASTABLE_ATTENTION_MASKS]
)
def test_call_attention_mask_not_broadcastable_raises_naming_argument(shape):
    layer = built()
    x, v = inputs()
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, v, attention_mask=torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize(
    "shape", [c[1] for c in NON_BROADCASTABLE_ATTENTION_MASKS[:3]], ids=[c[0] for c in NON_BROADCASTABLE_ATTENTION_MASKS[:3]]
)
def test_call_attention_mask_not_broadcastable_message_contains_received_shape(shape):
    layer = built()
    x, v = inputs()
    with pytest.raises(ValueError, match=names_and_value("attention_mask", str(tuple(shape)))):
        layer(x, v, attention_mask=torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize(
    "mask_shape",
    [(B, T, S), (T, S), (1, T, S), (B, 1, T, S), (B, 2, T, S), (S,), (1, 1, 1)],
    ids=["BTS", "TS", "1TS", "B1TS", "BNTS", "S_numpy_broadcast", "all_ones"],
)
def test_call_attention_mask_broadcastable_does_not_raise(mask_shape):
    layer = built()
    x, v = inputs()
    out = layer(x, v, attention_mask=torch.ones(mask_shape, dtype=torch.bool))
    assert out.shape == (B, T, D)


def test_call_valid_inputs_numpy_and_masks_do_not_raise():
    layer = built()
    x, v = inputs()
    out = layer(
        x.numpy(), v.numpy(), key=v.numpy(),
        query_mask=np.ones((B, T), bool), value_mask=np.ones((B, S), bool), key_mask=np.ones((B, S), bool),
        training=None, use_causal_mask=True, return_attention_scores=False,
    )
    assert out.shape == (B, T, D)


def test_call_multi_axis_batch_dim_mismatch_raises():
    # attention over dim 2 only: dim 1 is a batch-like dim and must agree.
    layer = MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(2,))
    with pytest.raises(ValueError, match=names_and_value("query", "value", "(2, 3, 3, 8)", "(2, 4, 5, 8)")):
        layer(torch.randn(B, 3, T, D), torch.randn(B, 4, S, D))


def test_call_multi_axis_attention_dims_may_differ_does_not_raise():
    layer = MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2))
    out = layer(torch.randn(B, 3, T, D), torch.randn(B, 4, S, D))
    assert out.shape == (B, 3, T, D)


@pytest.mark.parametrize("causal", [False, True], ids=["value_mask", "causal"])
def test_call_multi_axis_masks_not_broadcastable_raises_value_error(causal):
    # attention_axes=(1,) on rank 4: Keras's (B, T, X, 1) & (B, S, 1, X) cannot broadcast
    # when T != S; README promises a ValueError for every invalid input.
    layer = MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1,))
    q, v = torch.randn(B, T, 4, D), torch.randn(B, S, 4, D)
    extra = dict(use_causal_mask=True) if causal else dict(value_mask=torch.ones(B, S, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        layer(q, v, query_mask=torch.ones(B, T, 4, dtype=torch.bool), **extra)


# --------------------------------------------------------------------------------------
# backends that refuse
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of flash-attn")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_call_flash_attention_true_on_cpu_raises_listing_every_backend(dtype):
    layer = built(flash_attention=True)
    x, v = inputs()
    with pytest.raises(ValueError) as err:
        layer(x.to(dtype), v.to(dtype))
    msg = str(err.value)
    assert "flash_attention=True" in msg
    for backend in ("flash:", "sdpa:", "math:"):
        assert backend in msg, msg
    assert "CUDA" in msg
    assert "cpu" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of flash-attn")
def test_call_attention_backend_flash_on_cpu_raises_listing_every_backend():
    layer = built(attention_backend="flash")
    x, v = inputs()
    with pytest.raises(ValueError, match=names_and_value("attention_backend='flash'", "flash:", "sdpa:", "math:", "CUDA")):
        layer(x, v)


def test_call_sdpa_forced_with_scores_raises_listing_reasons():
    layer = built(attention_backend="sdpa")
    x, v = inputs()
    with pytest.raises(ValueError) as err:
        layer(x, v, return_attention_scores=True)
    msg = str(err.value)
    assert "attention_backend='sdpa'" in msg
    for backend in ("flash:", "sdpa:", "math:"):
        assert backend in msg, msg
    sdpa_part = msg.split("sdpa:", 1)[1].split(";", 1)[0]
    assert "return_attention_scores" in sdpa_part


def test_call_sdpa_forced_without_scores_does_not_raise():
    layer = built(attention_backend="sdpa")
    x, v = inputs()
    assert layer(x, v).shape == (B, T, D)
    assert layer.last_backend == "sdpa"


def test_call_flash_attention_false_with_scores_does_not_raise():
    layer = built(flash_attention=False)
    x, v = inputs()
    out, scores = layer(x, v, return_attention_scores=True)
    assert scores.shape == (B, 2, T, S)


# --------------------------------------------------------------------------------------
# set_weights
# --------------------------------------------------------------------------------------
def test_set_weights_wrong_count_raises_with_counts():
    layer = built()
    w = layer.get_weights()
    assert len(w) == 8  # 4 kernels + 4 biases
    with pytest.raises(ValueError, match=names_and_value("set_weights", "7", "8")):
        layer.set_weights(w[:-1])
    with pytest.raises(ValueError, match=names_and_value("set_weights", "9", "8")):
        layer.set_weights(w + [w[-1]])


def test_set_weights_wrong_shape_raises_with_both_shapes():
    layer = built()
    w = layer.get_weights()
    w[2] = np.zeros((D, 2, 5), np.float32)  # key kernel (8, 2, 4) given as (8, 2, 5)
    before = [p.detach().clone() for p in layer.weights]
    with pytest.raises(ValueError, match=names_and_value("weight shape", "(8, 2, 4)", "(8, 2, 5)")):
        layer.set_weights(w)
    # Nothing was written: the check precedes every copy.
    for b, p in zip(before, layer.weights):
        assert torch.equal(b, p)


def test_set_weights_unbuilt_raises():
    layer = MultiHeadAttention(num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match=names_and_value("set_weights", "build")):
        layer.set_weights([])


def test_set_weights_valid_does_not_raise_and_copies():
    layer = built()
    w = [np.full(a.shape, 0.25, np.float64) for a in layer.get_weights()]
    layer.set_weights(w)
    for p in layer.weights:
        assert torch.all(p == 0.25)


# --------------------------------------------------------------------------------------
# Keras's own error phrases (Keras's test suite matches them) and non-tensor masks
# --------------------------------------------------------------------------------------
def test_attention_axes_error_carries_keras_phrase():
    with pytest.raises(ValueError, match=r"`attention_axes` must be an int, list, or tuple\.") as info:
        MultiHeadAttention(num_heads=2, key_dim=4, attention_axes="ab")
    assert "Received: attention_axes='ab'" in str(info.value)


def test_output_shape_error_carries_keras_phrase():
    with pytest.raises(ValueError, match=r"Invalid `output_shape`") as info:
        MultiHeadAttention(num_heads=2, key_dim=16, output_shape=8.0)
    assert "Received: output_shape=8.0" in str(info.value)


@pytest.mark.parametrize("layer", ["mha", "gqa"])
def test_key_value_shape_mismatch_says_must_be_equal(layer):
    from dist_mha import GroupQueryAttention

    make = (lambda: MultiHeadAttention(num_heads=4, key_dim=2, value_dim=2)) if layer == "mha" else (
        lambda: GroupQueryAttention(head_dim=2, num_query_heads=4, num_key_value_heads=4))
    query_shape, value_shape, key_shape = (2, 4, 8), (2, 2, 8), (2, 3, 8)
    with pytest.raises(ValueError, match=r"must be equal"):
        make().compute_output_shape(query_shape, value_shape, key_shape)
    with pytest.raises(ValueError, match=r"(?s)must be equal.*Received"):
        make()(torch.ones(query_shape), torch.ones(value_shape), torch.ones(key_shape))


@pytest.mark.parametrize("bad,text", [("causal", "attention_mask='causal'"), (object(), "an object of type object"),
                                      (3, "attention_mask=3"), (True, "attention_mask=True")])
def test_non_tensor_attention_mask_raises_naming_argument_and_value(bad, text):
    q, v = inputs()
    with pytest.raises(ValueError, match=names_and_value("`attention_mask`", text, "expected a bool tensor")):
        built()(q, v, attention_mask=bad)


def test_string_attention_mask_points_to_use_causal_mask():
    q, v = inputs()
    with pytest.raises(ValueError, match="use_causal_mask=True"):
        built()(q, v, attention_mask="causal")


def test_nested_list_attention_mask_still_works():
    q, v = inputs()
    mask = [[[True] * S] * T] * B
    torch.testing.assert_close(built()(q, v, attention_mask=mask).shape, torch.Size([B, T, D]))


@pytest.mark.parametrize("bad,text", [({"query": 1}, "weights of type dict with keys ['query']"),
                                      ("weights", "weights of type str")])
def test_set_weights_with_a_dict_or_string_says_what_it_expects(bad, text):
    layer = built()
    with pytest.raises(ValueError, match=names_and_value("`weights`", text, "get_weights() order", "load_state_dict")):
        layer.set_weights(bad)

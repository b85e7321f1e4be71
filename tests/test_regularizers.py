"""Tests for dist_mha.keras_objects.regularizers, with real Keras as the oracle."""

import json
import math

import pytest
import torch

keras = pytest.importorskip("keras", minversion="3.15", reason="needs keras>=3.15 (the dev extra) as the oracle")
from keras.src.regularizers import ALL_OBJECTS_DICT as KERAS_TABLE  # noqa: E402

from dist_mha.keras_objects import regularizers as ours

CASES = [
    ("L1", {}), ("L1", {"l1": 0.1}), ("L1", {"l1": 1 / 3}), ("L1", {"l1": None}), ("L1", {"l1": 2}),
    ("L2", {}), ("L2", {"l2": 0.3}), ("L2", {"l2": None}), ("L2", {"l2": 1 / 3}),
    ("L1L2", {}), ("L1L2", {"l1": 0.1, "l2": 0.2}), ("L1L2", {"l1": None, "l2": 0.5}),
    ("L1L2", {"l1": 1}),
]


def _pair(name, kwargs):
    return getattr(ours, name)(**kwargs), getattr(keras.regularizers, name)(**kwargs)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_serialize_matches_keras(name, kwargs):
    mine, theirs = _pair(name, kwargs)
    assert ours.serialize(mine) == keras.regularizers.serialize(theirs)
    assert mine.get_config() == theirs.get_config()
    cfg = json.loads(json.dumps(ours.serialize(mine)))
    assert ours.serialize(ours.get(cfg)) == ours.serialize(mine)
    back = keras.regularizers.deserialize(ours.serialize(mine))
    assert keras.regularizers.serialize(back) == ours.serialize(mine)
    assert ours.serialize(ours.get(theirs)) == keras.regularizers.serialize(theirs)


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_match_keras(name, kwargs, shape, dtype):
    mine, theirs = _pair(name, kwargs)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)), dtype=dtype)
    got, want = mine(x), keras.ops.convert_to_tensor(theirs(x))
    assert got.dtype == want.dtype == dtype and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_additive_over_disjoint_shards(name, kwargs):
    mine = getattr(ours, name)(**kwargs)
    assert mine.additive is True
    x = torch.randn(8, 6, 4, dtype=torch.float64)
    for dim in range(3):
        for parts in (2, 4):
            total = sum(mine(s) for s in x.chunk(parts, dim))
            torch.testing.assert_close(total, mine(x), rtol=1e-12, atol=1e-15)


def test_callables_are_wrapped_and_not_additive():
    def max_abs(x):
        return 0.5 * torch.max(torch.abs(x))

    reg = ours.get(max_abs)
    assert reg.additive is False
    x = torch.randn(5, 5)
    assert torch.equal(reg(x), max_abs(x))
    # A Keras regularizer with no equivalent here is kept as a callable.
    orth = keras.regularizers.OrthogonalRegularizer(factor=0.2)
    wrapped = ours.get(orth)
    assert wrapped.additive is False
    torch.testing.assert_close(wrapped(x), keras.ops.convert_to_tensor(orth(x)))
    cfg = ours.serialize(reg)
    json.dumps(cfg)
    assert cfg["config"].endswith("max_abs")
    with pytest.raises(ValueError, match="cannot be deserialized"):
        ours.get(cfg)


def test_get_by_name_matches_keras_table():
    for key, cls in KERAS_TABLE.items():
        if cls.__name__ in ("Regularizer", "OrthogonalRegularizer"):
            with pytest.raises(ValueError, match=key):
                ours.get(key)
            continue
        assert ours.serialize(ours.get(key)) == keras.regularizers.serialize(
            keras.regularizers.get(key)), key
    # Keras documents "l1_l2" as L1L2(l1=0.01, l2=0.01).
    assert ours.serialize(ours.get("l1_l2")) == keras.regularizers.serialize(
        keras.regularizers.L1L2(l1=0.01, l2=0.01))
    assert isinstance(ours.get(keras.regularizers.L2), ours.L2)
    assert isinstance(ours.get({"class_name": "l2", "config": {"l2": 0.5}}), ours.L2)
    assert ours.get(None) is None


@pytest.mark.parametrize("bad", ["L3", "L1_L2", 0.5, {"class_name": "Nope", "config": {}}])
def test_invalid_identifier_message(bad):
    with pytest.raises(ValueError) as err:
        ours.get(bad, "kernel_regularizer")
    msg = str(err.value)
    assert "`kernel_regularizer`" in msg and f"kernel_regularizer={bad!r}" in msg


@pytest.mark.parametrize("name,arg", [("L1", "l1"), ("L2", "l2"), ("L1L2", "l1"), ("L1L2", "l2")])
@pytest.mark.parametrize("value", [-0.1, math.inf, math.nan, "0.1"])
def test_invalid_factors_raise_like_keras(name, arg, value):
    with pytest.raises(ValueError) as theirs:
        getattr(keras.regularizers, name)(**{arg: value})
    with pytest.raises(ValueError) as mine:
        getattr(ours, name)(**{arg: value})
    assert str(mine.value) == str(theirs.value)

"""Tests for dist_mha.keras_objects.constraints, with real Keras as the oracle."""

import json

import pytest
import torch

keras = pytest.importorskip("keras", minversion="3.15", reason="needs keras>=3.15 (the dev extra) as the oracle")
from keras.src.constraints import ALL_OBJECTS_DICT as KERAS_TABLE  # noqa: E402

from dist_mha.keras_objects import constraints as ours

CONFIG_CASES = [
    ("MaxNorm", {}), ("MaxNorm", {"max_value": 3, "axis": (0, 1)}),
    ("MaxNorm", {"max_value": 1.5, "axis": -1}), ("MinMaxNorm", {}),
    ("MinMaxNorm", {"min_value": 0.5, "max_value": 2.0, "rate": 0.7, "axis": [0, 2]}),
    ("NonNeg", {}), ("UnitNorm", {}), ("UnitNorm", {"axis": (0, 1)}),
]
AXES_2D = [0, 1, -1, (0, 1), None]
AXES_3D = [0, 2, -1, (0, 1), [0, 2], (-3, -2), (0, 1, 2)]


def _make(name, axis):
    kwargs = {"NonNeg": {}, "UnitNorm": {"axis": axis},
              "MaxNorm": {"max_value": 1.2, "axis": axis},
              "MinMaxNorm": {"min_value": 0.8, "max_value": 1.5, "rate": 0.6, "axis": axis}}[name]
    return getattr(ours, name)(**kwargs), getattr(keras.constraints, name)(**kwargs)


def _weight(shape, dtype=torch.float32, seed=0):
    # Scale rows so some norms fall below, inside and above the clip bounds.
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=dtype)
    return w * torch.linspace(0.05, 1.0, shape[-1], dtype=dtype)


@pytest.mark.parametrize("name,kwargs", CONFIG_CASES)
def test_serialize_matches_keras(name, kwargs):
    mine, theirs = getattr(ours, name)(**kwargs), getattr(keras.constraints, name)(**kwargs)
    assert ours.serialize(mine) == keras.constraints.serialize(theirs)
    assert ours.serialize(ours.get(ours.serialize(mine))) == ours.serialize(mine)
    back = keras.constraints.deserialize(ours.serialize(mine))
    assert keras.constraints.serialize(back) == ours.serialize(mine)
    assert ours.serialize(ours.get(theirs)) == keras.constraints.serialize(theirs)
    assert mine.needs_norm is (name != "NonNeg")
    if mine.needs_norm:
        assert mine.axis == kwargs.get("axis", 0)


@pytest.mark.parametrize("name", ["MaxNorm", "MinMaxNorm", "UnitNorm", "NonNeg"])
@pytest.mark.parametrize("shape,axis", [((6, 5), a) for a in AXES_2D]
                         + [((4, 5, 6), a) for a in AXES_3D])
def test_values_match_keras(name, shape, axis):
    mine, theirs = _make(name, axis)
    w = _weight(shape) * 3.0
    got, want = mine(w), keras.ops.convert_to_tensor(theirs(w))
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # float64: Keras's torch backend rounds clip bounds to float32 (and NonNeg
    # returns float32); we stay in float64, so agreement is to float32 level.
    w64 = w.double()
    got = mine(w64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, keras.ops.convert_to_tensor(theirs(w64)).double(),
                               rtol=1e-6, atol=1e-7)


def _apply_sharded(c, shards, dim_in_axis):
    """Simulates ranks holding `shards`, with an all-reduce-sum across them."""
    if not dim_in_axis:
        return [c(s) for s in shards]
    partial = []
    for s in shards:  # first pass records each rank's local sum of squares
        c(s, allreduce_sum=lambda t: partial.append(t) or t)
    outs = []
    for i, s in enumerate(shards):
        others = [p for j, p in enumerate(partial) if j != i]
        outs.append(c(s, allreduce_sum=lambda t, others=others: t + sum(others)))
    return outs


@pytest.mark.parametrize("name", ["MaxNorm", "MinMaxNorm", "UnitNorm", "NonNeg"])
@pytest.mark.parametrize("axis", [0, 1, (0, 1), [1, 2], -1, (-3, -1)])
@pytest.mark.parametrize("shard_dim", [0, 1, 2])
@pytest.mark.parametrize("parts", [2, 3])
def test_sharded_application_equals_full(name, axis, shard_dim, parts):
    shape = (6, 9, 12)
    mine, theirs = _make(name, axis)
    axes = {a % 3 for a in ((axis,) if isinstance(axis, int) else axis)}
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        w = _weight(shape, dtype, seed=shard_dim) * 3.0
        outs = _apply_sharded(mine, list(w.chunk(parts, shard_dim)),
                              mine.needs_norm and shard_dim in axes)
        full = mine(w) if dtype == torch.float64 else keras.ops.convert_to_tensor(theirs(w))
        torch.testing.assert_close(torch.cat(outs, shard_dim), full, rtol=tol, atol=tol * 1e-2)


def test_without_allreduce_a_shard_across_the_axis_is_wrong():
    # Guards the test above: the all-reduce path must actually matter.
    c = ours.UnitNorm(axis=0)
    w = _weight((6, 4))
    assert not torch.allclose(torch.cat([c(s) for s in w.chunk(2, 0)]), c(w))


def test_callable_constraints():
    def clip(w):
        return torch.clamp(w, -0.1, 0.1)

    c = ours.get(clip)
    assert c.needs_norm is True and c.axis is None  # unknown: treat as whole-tensor
    w = _weight((4, 4))
    assert torch.equal(c(w), clip(w))
    with pytest.raises(ValueError, match="shard"):
        c(w, allreduce_sum=lambda t: t)
    cfg = ours.serialize(c)
    json.dumps(cfg)
    assert cfg["config"].endswith("clip")
    with pytest.raises(ValueError, match="cannot be deserialized"):
        ours.get(cfg)


def test_get_by_name_matches_keras_table():
    for key, cls in KERAS_TABLE.items():
        if cls.__name__ == "Constraint":
            continue
        assert ours.serialize(ours.get(key)) == keras.constraints.serialize(
            keras.constraints.get(key)), key
    assert isinstance(ours.get(keras.constraints.NonNeg), ours.NonNeg)
    assert isinstance(ours.get({"class_name": "max_norm", "config": {"axis": 1}}), ours.MaxNorm)
    assert ours.get(None) is None


@pytest.mark.parametrize("bad", ["maxnorm", "Max_Norm", 3, {"class_name": "Nope", "config": {}}])
def test_invalid_identifier_message(bad):
    with pytest.raises(ValueError):
        keras.constraints.get(bad)
    with pytest.raises(ValueError) as err:
        ours.get(bad, "kernel_constraint")
    msg = str(err.value)
    assert "`kernel_constraint`" in msg and f"kernel_constraint={bad!r}" in msg
    assert "max_norm" in msg

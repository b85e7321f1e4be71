"""Tests for dist_mha.keras_objects.initializers, with real Keras as the oracle."""

import json
import math

import numpy as np
import pytest
import torch

keras = pytest.importorskip("keras", minversion="3.15", reason="needs keras>=3.15 (the dev extra) as the oracle")
from keras.src.initializers import ALL_OBJECTS_DICT as KERAS_TABLE  # noqa: E402

from dist_mha.keras_objects import initializers as ours

SHAPE = (64, 8, 16)  # q/k/v kernel (D, N, H): fan_in=D, fan_out=N*H
QKV = dict(equation="abc,cde->abde", output_shape=(None, 8, 16), input_shape=(None, None, 64),
           kernel=SHAPE, fan_in=64, fan_out=128)
# Output kernel (N, Hv, D): fan_in=N*Hv, fan_out=D.
OUT = dict(equation="abcd,cde->abe", output_shape=(None, 64), input_shape=(None, None, 8, 16),
           kernel=(8, 16, 64), fan_in=128, fan_out=64)
SEEDS = range(4)

CONFIG_CASES = [
    ("Zeros", {}), ("Ones", {}), ("Constant", {}), ("Constant", {"value": 3}),
    ("Constant", {"value": 0.25}), ("RandomUniform", {}),
    ("RandomUniform", {"minval": -1, "maxval": 2.5, "seed": 7}),
    ("RandomNormal", {}), ("RandomNormal", {"mean": 1.0, "stddev": 2, "seed": 0}),
    ("TruncatedNormal", {}), ("TruncatedNormal", {"mean": -0.5, "stddev": 0.1, "seed": 12}),
    ("VarianceScaling", {}),
    ("VarianceScaling", {"scale": 2, "mode": "fan_avg", "distribution": "normal", "seed": 3}),
    ("VarianceScaling", {"mode": "fan_out", "distribution": "UNIFORM"}),
    ("VarianceScaling", {"distribution": "untruncated_normal", "input_axes": [0],
                         "output_axes": [1, 2]}),
    ("Orthogonal", {}), ("Orthogonal", {"gain": 0.5, "seed": 2}),
] + [(name, kwargs) for name in ("GlorotUniform", "GlorotNormal", "HeUniform", "HeNormal",
                                 "LecunUniform", "LecunNormal")
     for kwargs in ({}, {"seed": 1, "input_axes": (0,), "output_axes": (1, 2)})]

DIST_CASES = [
    ("GlorotUniform", {}), ("GlorotNormal", {}), ("HeUniform", {}), ("HeNormal", {}),
    ("LecunUniform", {}), ("LecunNormal", {}),
    ("VarianceScaling", {"scale": 2.0, "mode": "fan_out", "distribution": "uniform"}),
    ("VarianceScaling", {"scale": 0.5, "mode": "fan_avg", "distribution": "untruncated_normal"}),
    ("VarianceScaling", {"scale": 1.5, "mode": "fan_in", "distribution": "normal"}),
    ("RandomUniform", {"minval": -0.3, "maxval": 0.1}),
    ("RandomNormal", {"mean": 0.2, "stddev": 0.5}),
    ("TruncatedNormal", {"mean": -0.1, "stddev": 0.3}),
]


def _ks_2samp(a, b):
    try:
        from scipy.stats import ks_2samp
    except ImportError:
        a, b = np.sort(a), np.sort(b)
        grid = np.concatenate([a, b])
        cdf_a = np.searchsorted(a, grid, side="right") / a.size
        cdf_b = np.searchsorted(b, grid, side="right") / b.size
        return float(np.max(np.abs(cdf_a - cdf_b)))
    return float(ks_2samp(a, b).statistic)


def _keras_kernels(name, kwargs, kind):
    out = []
    for seed in SEEDS:
        init = getattr(keras.initializers, name)(**kwargs, seed=seed)
        layer = keras.layers.EinsumDense(kind["equation"], output_shape=kind["output_shape"],
                                         kernel_initializer=init)
        layer.build(kind["input_shape"])
        out.append(keras.ops.convert_to_numpy(layer.kernel))
    return np.stack(out)


def _our_kernels(name, kwargs, kind):
    init = getattr(ours, name)(**kwargs)
    return np.stack([init(kind["kernel"], torch.float32, fan_in=kind["fan_in"],
                          fan_out=kind["fan_out"], base_seed=s).numpy() for s in SEEDS])


@pytest.mark.parametrize("name,kwargs", CONFIG_CASES)
def test_serialize_matches_keras(name, kwargs):
    mine, theirs = getattr(ours, name)(**kwargs), getattr(keras.initializers, name)(**kwargs)
    assert ours.serialize(mine) == keras.initializers.serialize(theirs)
    assert mine.get_config() == theirs.get_config()
    # Round trips: through our get, and through Keras's own deserializer.
    assert ours.serialize(ours.get(ours.serialize(mine))) == ours.serialize(mine)
    assert ours.serialize(ours.get(json.loads(json.dumps(ours.serialize(mine))))) == \
        json.loads(json.dumps(ours.serialize(mine)))
    back = keras.initializers.deserialize(ours.serialize(mine))
    assert keras.initializers.serialize(back) == ours.serialize(mine)
    # A Keras object converts to ours with the same config.
    assert ours.serialize(ours.get(theirs)) == keras.initializers.serialize(theirs)


def test_get_by_name_matches_keras_table():
    unsupported = {"Identity", "STFT", "Initializer"}
    for key, cls in KERAS_TABLE.items():
        if cls.__name__ in unsupported:
            with pytest.raises(ValueError, match=key):
                ours.get(key)
            continue
        mine = ours.get(key)
        if cls.__name__ == "Constant":  # Keras's get("constant") raises KeyError
            assert ours.serialize(mine) == keras.initializers.serialize(cls())
            continue
        theirs = keras.initializers.get(key)
        assert type(mine).__name__ == type(theirs).__name__, key
        assert ours.serialize(mine) == keras.initializers.serialize(theirs), key
    for bad in ("GLOROT_UNIFORM", "Glorot_Uniform", "glorotuniform"):
        with pytest.raises(ValueError):
            keras.initializers.get(bad)
        with pytest.raises(ValueError, match="kernel_initializer"):
            ours.get(bad, "kernel_initializer")


def test_get_from_dicts_classes_instances():
    init = ours.get({"class_name": "RandomNormal", "config": {"stddev": 2.0}})
    assert init.get_config() == {"seed": None, "mean": 0.0, "stddev": 2.0}
    assert isinstance(ours.get({"class_name": "glorot_uniform", "config": {}}), ours.GlorotUniform)
    assert isinstance(ours.get(keras.initializers.HeNormal), ours.HeNormal)
    assert isinstance(ours.get(ours.LecunNormal), ours.LecunNormal)
    mine = ours.Orthogonal(seed=3)
    assert ours.get(mine) is mine
    assert ours.get(None) is None
    seeded = keras.initializers.GlorotUniform(seed=keras.random.SeedGenerator(5))
    assert ours.get(seeded).seed == 5


def test_get_wraps_callables_and_keras_objects_without_equivalent():
    def ramp(shape, dtype=None):
        return torch.arange(math.prod(shape), dtype=dtype).reshape(shape)

    init = ours.get(ramp)
    got = init((4, 6), torch.float64, fan_in=3, fan_out=5, salt=2, base_seed=1,
               index=(slice(1, 3), slice(2, 6)))
    assert torch.equal(got, ramp((4, 6), torch.float64)[1:3, 2:6])
    ident = ours.get(keras.initializers.Identity(gain=2.0))
    expect = keras.ops.convert_to_numpy(keras.initializers.Identity(gain=2.0)((5, 5)))
    np.testing.assert_array_equal(ident((5, 5), torch.float32).numpy(), expect)
    # Serializes to something JSON-friendly that get() refuses, by design.
    for obj in (ramp, init):
        cfg = ours.serialize(obj)
        json.dumps(cfg)
        assert cfg["config"].endswith("ramp")
        with pytest.raises(ValueError, match="cannot be deserialized"):
            ours.get(cfg)


@pytest.mark.parametrize("bad", ["foo", 42, 1.5, {"class_name": "Nope", "config": {}}, [1]])
def test_invalid_identifier_message(bad):
    with pytest.raises(ValueError) as err:
        ours.get(bad, "kernel_initializer")
    msg = str(err.value)
    assert "`kernel_initializer`" in msg and f"kernel_initializer={bad!r}" in msg
    assert "glorot_uniform" in msg and "callable" in msg


@pytest.mark.parametrize("kwargs", [{"scale": 0.0}, {"scale": -1.0}, {"mode": "fan_sum"},
                                    {"distribution": "cauchy"}])
def test_variance_scaling_argument_errors_like_keras(kwargs):
    with pytest.raises(ValueError):
        keras.initializers.VarianceScaling(**kwargs)
    with pytest.raises(ValueError):
        ours.VarianceScaling(**kwargs)


@pytest.mark.parametrize("kind", [QKV, OUT], ids=["qkv_kernel", "output_kernel"])
@pytest.mark.parametrize("name,kwargs", DIST_CASES)
def test_distribution_matches_keras_layer_init(name, kwargs, kind):
    theirs = _keras_kernels(name, kwargs, kind).ravel().astype(np.float64)
    mine = _our_kernels(name, kwargs, kind).ravel().astype(np.float64)
    std = theirs.std()
    assert abs(mine.std() / std - 1.0) < 0.03
    assert abs(mine.mean() - theirs.mean()) < 0.05 * std
    assert _ks_2samp(mine, theirs) < 1.95 * math.sqrt(2.0 / mine.size)  # alpha = 0.001
    cfg = getattr(keras.initializers, name)(**kwargs).get_config()
    if cfg.get("distribution") == "uniform" or name == "RandomUniform":
        if name == "RandomUniform":
            lo, hi = kwargs["minval"], kwargs["maxval"]
        else:
            n = {"fan_in": kind["fan_in"], "fan_out": kind["fan_out"],
                 "fan_avg": (kind["fan_in"] + kind["fan_out"]) / 2}[cfg["mode"]]
            hi = math.sqrt(3.0 * cfg["scale"] / n)
            lo = -hi
        width, tol = hi - lo, 1e-6 * (hi - lo)
        for sample in (mine, theirs):  # Keras confirms the limit formula
            assert lo - tol <= sample.min() < lo + 0.002 * width
            assert hi - 0.002 * width < sample.max() <= hi + tol
    elif cfg.get("distribution") != "untruncated_normal" and name != "RandomNormal":
        # Truncated at 2 stddev: the tails of ours and Keras's end at the same place.
        q_mine, q_theirs = np.quantile(np.abs(mine - mine.mean()), [0.999, 1.0]), \
            np.quantile(np.abs(theirs - theirs.mean()), 0.999)
        assert abs(q_mine[0] / q_theirs - 1.0) < 0.03
        center = kwargs.get("mean", 0.0)
        bound = 2 * (kwargs["stddev"] if name == "TruncatedNormal" else std / 0.8796)
        assert np.max(np.abs(mine - center)) <= bound * 1.02


def test_fans_default_to_keras_compute_fans():
    from keras.src.initializers.random_initializers import compute_fans as keras_fans

    for shape in [(), (7,), (5, 3), (3, 4, 5), (2, 3, 4, 5)]:
        assert ours.compute_fans(shape) == keras_fans(shape)
    assert ours.compute_fans(SHAPE, [0], [1, 2]) == keras_fans(SHAPE, [0], [1, 2])
    # Without overrides we see Keras's standalone-call fans; limits must agree.
    a = ours.HeUniform()((40, 30), torch.float64, base_seed=0)
    b = keras.ops.convert_to_numpy(keras.initializers.HeUniform(seed=0)((40, 30)))
    assert abs(float(a.abs().max()) / np.abs(b).max() - 1) < 0.02
    c = ours.GlorotUniform(input_axes=[0], output_axes=[1, 2])(SHAPE, base_seed=0)
    assert float(c.abs().max()) <= math.sqrt(6 / (64 + 128)) * (1 + 1e-6)


def test_mha_kernels_use_einsum_dense_fans():
    mha = keras.layers.MultiHeadAttention(
        num_heads=8, key_dim=16, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    mha.build((2, 5, 64), (2, 5, 64))
    for kernel, kind in ((mha._query_dense.kernel, QKV), (mha._output_dense.kernel, OUT)):
        theirs = np.abs(keras.ops.convert_to_numpy(kernel)).max()
        mine = ours.GlorotUniform(seed=1)(kind["kernel"], fan_in=kind["fan_in"],
                                          fan_out=kind["fan_out"]).abs().max()
        assert tuple(kernel.shape) == kind["kernel"]
        assert abs(float(mine) / theirs - 1.0) < 0.01


def test_seeding_and_salts():
    shape = (16, 8)
    a = ours.GlorotUniform(seed=5)(shape)
    assert torch.equal(a, ours.GlorotUniform(seed=5)(shape, base_seed=99))
    assert not torch.equal(a, ours.GlorotUniform(seed=6)(shape))
    assert not torch.equal(a, ours.GlorotUniform(seed=5)(shape, salt=1))
    assert not torch.equal(ours.GlorotUniform(seed=5)(shape, salt="query"),
                           ours.GlorotUniform(seed=5)(shape, salt="key"))
    init = ours.HeNormal()
    torch.manual_seed(0)
    first, second = init(shape), init(shape)
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(first, init(shape))
    # An int seed or a base_seed leaves torch's global RNG untouched.
    state = torch.get_rng_state()
    x = init(shape, base_seed=3)
    ours.HeNormal(seed=3)(shape)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(x, init(shape, base_seed=3))


RANDOM_INITS = [ours.RandomUniform(seed=1), ours.RandomNormal(seed=1), ours.TruncatedNormal(seed=1),
                ours.VarianceScaling(seed=1, distribution="uniform"),
                ours.VarianceScaling(seed=1, distribution="untruncated_normal"),
                ours.VarianceScaling(seed=1), ours.GlorotUniform(seed=1), ours.HeNormal(seed=1),
                ours.Orthogonal(seed=1), ours.Constant(2.5), ours.Zeros(), ours.Ones()]


@pytest.mark.parametrize("init", RANDOM_INITS, ids=lambda i: type(i).__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_property_bitwise(init, dtype):
    kw = dict(fan_in=64, fan_out=128, salt=3)
    full = init(SHAPE, dtype, **kw)
    assert full.shape == SHAPE and full.dtype == dtype
    for dim, parts in ((0, 4), (1, 2), (1, 8), (2, 4)):
        size = SHAPE[dim] // parts
        shards = [init(SHAPE, dtype, index=(slice(None),) * dim + (slice(i * size, (i + 1) * size),),
                       **kw) for i in range(parts)]
        assert torch.equal(torch.cat(shards, dim), full)
    block = (slice(5, 37), slice(2, 6), slice(7, 16))
    assert torch.equal(init(SHAPE, dtype, index=block, **kw), full[block])


@pytest.mark.parametrize("shape", [(64, 8, 16), (16, 64), (8, 16, 64), (3, 3, 4, 4)])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_orthogonal_matches_keras_shape_handling(shape, gain):
    def gram(w):
        flat = np.asarray(w, dtype=np.float64).reshape(-1, shape[-1])
        return flat.T @ flat if flat.shape[0] >= flat.shape[1] else flat @ flat.T

    mine = ours.Orthogonal(gain=gain, seed=4)(shape, torch.float64).numpy()
    theirs = keras.ops.convert_to_numpy(
        keras.initializers.Orthogonal(gain=gain, seed=4)(shape, dtype="float64"))
    assert mine.shape == theirs.shape == shape
    eye = gain**2 * np.eye(min(math.prod(shape[:-1]), shape[-1]))
    np.testing.assert_allclose(gram(theirs), eye, atol=1e-10)  # oracle: same flattening
    np.testing.assert_allclose(gram(mine), eye, atol=1e-10)
    assert abs(mine.std() / theirs.std() - 1) < 0.1


def test_orthogonal_is_sign_fixed_qr_of_the_keyed_normal_matrix():
    # Keras: a = normal((max, min)); q, r = qr(a); q *= sign(diag(r)). So
    # q.T @ a == r * sign(diag(r)): upper triangular with a positive diagonal.
    from dist_mha.rng.counter import mix64, normal

    for shape in [(12, 5), (5, 12)]:
        q = ours.Orthogonal(seed=4)(shape, torch.float64, salt=2)
        q = q if shape[0] >= shape[1] else q.T
        r = q.T @ normal(mix64(4, 2), q.shape)
        assert torch.all(torch.diagonal(r) > 0)
        torch.testing.assert_close(torch.tril(r, -1), torch.zeros_like(r), atol=1e-12, rtol=0)


def test_orthogonal_rank_one_raises():
    with pytest.raises(ValueError):
        keras.initializers.Orthogonal()((5,))
    with pytest.raises(ValueError, match="two-dimensional"):
        ours.Orthogonal()((5,))


def test_dtypes_and_constants():
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert ours.GlorotUniform(seed=0)((3, 4)).dtype == torch.float64
    finally:
        torch.set_default_dtype(old)
    assert ours.RandomNormal(seed=0)((3, 4), "bfloat16").dtype == torch.bfloat16
    for name, kwargs in (("Constant", {"value": 3}), ("Zeros", {}), ("Ones", {})):
        mine = getattr(ours, name)(**kwargs)((2, 3), torch.int32)
        theirs = keras.ops.convert_to_numpy(getattr(keras.initializers, name)(**kwargs)(
            (2, 3), dtype="int32"))
        np.testing.assert_array_equal(mine.numpy(), theirs)
    trunc = ours.TruncatedNormal(mean=1.0, stddev=0.5, seed=0)((10000,), torch.float64)
    assert 0.0 <= float(trunc.min()) and float(trunc.max()) <= 2.0

"""Keras 3 weight initializers that can generate one shard of a weight.

Names, defaults, configs and distributions follow `keras.initializers`, but
sampling goes through `dist_mha.rng.counter`, so a tensor-parallel rank can
draw only its block (`index=`) and get exactly what the full weight holds
there, whatever the sharding. Values are identically distributed to Keras's,
not bit-identical (different generator).

The random stream of a call is `mix64(base, salt)`: `base` is the int `seed`,
else `base_seed`, else one draw from torch's global CPU generator (so
`torch.manual_seed` makes unseeded layers reproducible); `salt` separates the
kernels of one layer. Sampling is float64, then cast to `dtype`.
"""

from __future__ import annotations

import math

import torch

from dist_mha.keras_objects import registry
from dist_mha.rng import counter
from dist_mha.rng.counter import mix64

# Keras's constant: stddev of a unit normal truncated to [-2, 2]; dividing by
# it makes the truncated draw have the requested variance.
_TRUNC_STD = 0.87962566103423978


def compute_fans(shape, input_axes=None, output_axes=None):
    """Computes `(fan_in, fan_out)` of a weight shape exactly as Keras does.

    Args:
        shape: integer shape tuple.
        input_axes: axes whose sizes multiply into fan_in; used only when
            `output_axes` is given too (as in Keras).
        output_axes: axes whose sizes multiply into fan_out.

    Returns:
        A tuple of two Python ints.
    """
    shape = tuple(shape)
    if input_axes is not None and output_axes is not None:
        return math.prod(shape[a] for a in input_axes), math.prod(shape[a] for a in output_axes)
    if len(shape) < 2:
        return (int(shape[0]),) * 2 if shape else (1, 1)
    receptive = math.prod(shape[:-2])  # convolution-style kernel
    return int(shape[-2] * receptive), int(shape[-1] * receptive)


class Initializer(registry.KerasObject):
    """Base class; subclasses implement `_sample(shape, ctx)`."""

    def __call__(self, shape, dtype=None, *, device=None, fan_in=None, fan_out=None,
                 salt=0, index=None, base_seed=None):
        """Returns block `index` of a weight of global shape `shape`.

        Args:
            shape: global shape of the weight.
            dtype: torch dtype or its name; default `torch.get_default_dtype()`.
            device: torch device of the result.
            fan_in: overrides the computed fan-in (variance scaling only).
            fan_out: overrides the computed fan-out (variance scaling only).
            salt: int or str telling apart weights that share a seed.
            index: optional tuple of step-1 slices selecting the local block.
            base_seed: base seed used when `seed` is not an int.

        Returns:
            A tensor equal to the full weight's `[index]` block.

        Raises:
            ValueError: on an invalid `index`.
        """
        shape = tuple(int(d) for d in shape)
        counter._block(shape, index)  # validates `index` before any work
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.split(".")[-1])
        ctx = dict(dtype=dtype or torch.get_default_dtype(), device=device, index=index,
                   salt=salt, base_seed=base_seed, fan_in=fan_in, fan_out=fan_out)
        return self._sample(shape, ctx).to(ctx["dtype"])



def _take(t, index):
    return t if index is None else t[index]


class Constant(Initializer):
    """Fills the weight with `value`.

    Args:
        value: a scalar (anything broadcastable to the shape also works).

    Example:

    >>> Constant(3.0)((2,), torch.float32)
    tensor([3., 3.])
    """

    def __init__(self, value=0.0):
        if isinstance(value, dict):  # Keras-serialized numpy/tensor value
            value = value.get("config", {}).get("value", value)
        self.value = value

    def _sample(self, shape, ctx):
        full = torch.as_tensor(self.value, dtype=ctx["dtype"], device=ctx["device"])
        return _take(full.expand(shape), ctx["index"]).clone()

    def get_config(self):
        # numpy/torch scalars become plain Python values, as Keras stores them.
        return {"value": self.value.tolist() if hasattr(self.value, "tolist") else self.value}


class Zeros(Constant):
    """Fills the weight with 0. Example: `Zeros()((2,))` gives `tensor([0., 0.])`."""

    def __init__(self):
        super().__init__(0)

    def get_config(self):
        return {}


class Ones(Constant):
    """Fills the weight with 1. Example: `Ones()((2,))` gives `tensor([1., 1.])`."""

    def __init__(self):
        super().__init__(1)

    def get_config(self):
        return {}


class RandomInitializer(Initializer):
    """Base of the random initializers: seed handling and stream keys.

    Args:
        seed: None or an int. A Keras `SeedGenerator` (object or serialized)
            is reduced to its int seed: draws here are stateless.

    Raises:
        ValueError: for any other seed.
    """

    def __init__(self, seed=None):
        if isinstance(seed, dict):
            seed = seed.get("config", {}).get("seed")
        elif type(seed).__name__ == "SeedGenerator" and hasattr(seed, "get_config"):
            seed = seed.get_config().get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ValueError("`seed` argument should be an instance of "
                             f"`keras.random.SeedGenerator()` or an integer. Received: seed={seed}")
        self.seed = seed

    def _key(self, ctx):
        base = self.seed if isinstance(self.seed, int) else ctx["base_seed"]
        if base is None:
            base = int(torch.randint(0, 2**62, (1,)).item())
        salt = ctx["salt"]
        if isinstance(salt, str):  # deterministic across processes, unlike hash()
            return mix64(int(base), -1, int.from_bytes(salt.encode("utf-8"), "little"))
        return mix64(int(base), int(salt))

    def _draw(self, kind, shape, ctx):
        fn = counter.normal if kind == "normal" else counter.uniform
        u = fn(self._key(ctx), shape, ctx["index"], device=ctx["device"])
        if kind != "truncated":
            return u
        # Inverse CDF of the unit normal truncated to [-2, 2]: exact, and per
        # element, so it keeps the block property that rejection would lose.
        lo = 0.5 * math.erfc(math.sqrt(2.0))
        return torch.special.ndtri(u.mul_(1.0 - 2.0 * lo).add_(lo)).clamp_(-2.0, 2.0)

    def get_config(self):
        return {"seed": self.seed}


class RandomUniform(RandomInitializer):
    """Uniform values in (minval, maxval).

    Args:
        minval: lower bound. maxval: upper bound. seed: None or an int.

    Example:

    >>> w = RandomUniform(seed=1)((4, 4), salt=0)
    """

    def __init__(self, minval=-0.05, maxval=0.05, seed=None):
        self.minval, self.maxval = minval, maxval
        super().__init__(seed=seed)

    def _sample(self, shape, ctx):
        return self._draw("uniform", shape, ctx) * (self.maxval - self.minval) + self.minval

    def get_config(self):
        return {**super().get_config(), "minval": self.minval, "maxval": self.maxval}


class RandomNormal(RandomInitializer):
    """Normal values. Args: mean, stddev, seed (None or an int)."""

    _kind = "normal"

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean, self.stddev = mean, stddev
        super().__init__(seed=seed)

    def _sample(self, shape, ctx):
        return self._draw(self._kind, shape, ctx) * self.stddev + self.mean

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


class TruncatedNormal(RandomNormal):
    """Normal values kept within 2 stddev of the mean, as Keras. Args as RandomNormal."""
    _kind = "truncated"


class VarianceScaling(RandomInitializer):
    """Samples with a scale adapted to the weight's fans, as Keras.

    With `n` = fan_in, fan_out or their mean (`mode`): "truncated_normal" has
    stddev `sqrt(scale/n) / 0.8796...` cut at 2 stddev, "untruncated_normal"
    stddev `sqrt(scale/n)`, "uniform" limit `sqrt(3*scale/n)`; "normal" is
    Keras's alias of "truncated_normal". Fans come from the call's
    `fan_in`/`fan_out` when given, else from `compute_fans`.

    Args:
        scale, mode, distribution, seed, input_axes, output_axes: as Keras.

    Raises:
        ValueError: on a non-positive scale or an unknown mode/distribution.
    """

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal",
                 seed=None, input_axes=None, output_axes=None):
        if scale <= 0.0:
            raise ValueError(f"Argument `scale` must be positive float. Received: scale={scale}")
        modes = {"fan_in", "fan_out", "fan_avg"}
        if mode not in modes:
            raise ValueError(f"Invalid `mode` argument: {mode}. Please use one of {modes}")
        distribution = distribution.lower()
        distribution = "truncated_normal" if distribution == "normal" else distribution
        dists = {"uniform", "truncated_normal", "untruncated_normal"}
        if distribution not in dists:
            raise ValueError(f"Invalid `distribution` argument: {distribution}."
                             f"Please use one of {dists}")
        self.scale, self.mode, self.distribution = scale, mode, distribution
        self.input_axes, self.output_axes = input_axes, output_axes
        super().__init__(seed=seed)

    def _sample(self, shape, ctx):
        fan_in, fan_out = compute_fans(shape, self.input_axes, self.output_axes)
        fan_in = fan_in if ctx["fan_in"] is None else ctx["fan_in"]
        fan_out = fan_out if ctx["fan_out"] is None else ctx["fan_out"]
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}
        scale = self.scale / max(1.0, n[self.mode])
        if self.distribution == "uniform":
            return (self._draw("uniform", shape, ctx) * 2.0 - 1.0) * math.sqrt(3.0 * scale)
        if self.distribution == "untruncated_normal":
            return self._draw("normal", shape, ctx) * math.sqrt(scale)
        return self._draw("truncated", shape, ctx) * (math.sqrt(scale) / _TRUNC_STD)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "mode": self.mode,
                "distribution": self.distribution, "input_axes": self.input_axes,
                "output_axes": self.output_axes}


class _Preset(VarianceScaling):
    """VarianceScaling with fixed `_args`; Args: seed, input_axes, output_axes."""

    _args = (1.0, "fan_in", "truncated_normal")

    def __init__(self, seed=None, input_axes=None, output_axes=None):
        super().__init__(*self._args, seed=seed, input_axes=input_axes, output_axes=output_axes)

    def get_config(self):
        return {"seed": self.seed, "input_axes": self.input_axes, "output_axes": self.output_axes}


class GlorotUniform(_Preset):
    """Glorot uniform: limit sqrt(6 / (fan_in + fan_out)). Args as VarianceScaling."""
    _args = (1.0, "fan_avg", "uniform")


class GlorotNormal(_Preset):
    """Glorot normal: truncated, stddev sqrt(2 / (fan_in + fan_out))."""
    _args = (1.0, "fan_avg", "truncated_normal")


class HeUniform(_Preset):
    """He uniform: limit sqrt(6 / fan_in)."""
    _args = (2.0, "fan_in", "uniform")


class HeNormal(_Preset):
    """He normal: truncated, stddev sqrt(2 / fan_in)."""
    _args = (2.0, "fan_in", "truncated_normal")


class LecunUniform(_Preset):
    """Lecun uniform: limit sqrt(3 / fan_in)."""
    _args = (1.0, "fan_in", "uniform")


class LecunNormal(_Preset):
    """Lecun normal: truncated, stddev sqrt(1 / fan_in)."""
    _args = (1.0, "fan_in", "truncated_normal")


class Orthogonal(RandomInitializer):
    """Keras's orthogonal initializer (QR of a normal matrix, sign-fixed).

    The weight is viewed as `(prod(shape[:-1]), shape[-1])`. QR needs the
    whole matrix, so this one is NOT generated blockwise: each rank builds
    the full matrix from the same key and slices its block (still identical
    across shardings, at the full weight's memory and compute cost).

    Args:
        gain: multiplicative factor. seed: None or an int.

    Raises:
        ValueError: when called with a shape of rank < 2.
    """

    def __init__(self, gain=1.0, seed=None):
        self.gain = gain
        super().__init__(seed=seed)

    def _sample(self, shape, ctx):
        if len(shape) < 2:
            raise ValueError("The tensor to initialize must be at least two-dimensional. "
                             f"Received: shape={shape} of rank {len(shape)}.")
        rows, cols = math.prod(shape[:-1]), shape[-1]
        a = counter.normal(self._key(ctx), (max(rows, cols), min(rows, cols)),
                               device=ctx["device"])
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r))
        q = q.T if rows < cols else q
        return _take(self.gain * q.reshape(shape), ctx["index"])

    def get_config(self):
        return {**super().get_config(), "gain": self.gain}


class _CallableInitializer(Initializer):
    """Wraps `fn(shape, dtype=None)`: builds the full weight, then slices.

    Fans, salt and base_seed are dropped. Serializes to its qualified name
    only, which cannot be deserialized.
    """

    def __init__(self, fn):
        self.fn = fn

    def _sample(self, shape, ctx):
        full = torch.as_tensor(self.fn(shape, dtype=ctx["dtype"]), device=ctx["device"])
        if tuple(full.shape) != shape:
            raise ValueError(f"Initializer {self.fn!r} returned shape {tuple(full.shape)}, "
                             f"expected {shape}.")
        return _take(full, ctx["index"])

    def __repr__(self):
        return f"_CallableInitializer({self.fn!r})"


_CLASSES = [Constant, Zeros, Ones, RandomUniform, RandomNormal, TruncatedNormal, VarianceScaling,
            GlorotUniform, GlorotNormal, HeUniform, HeNormal, LecunUniform, LecunNormal, Orthogonal]
ALL_OBJECTS_DICT = {**{c.__name__: c for c in _CLASSES}, **{registry.snake_case(c.__name__): c for c in _CLASSES},
                    "normal": RandomNormal, "uniform": RandomUniform, "one": Ones,
                    "zero": Zeros, "OrthogonalInitializer": Orthogonal}


def serialize(initializer):
    """Returns Keras's serialized dict of `initializer` (None gives None).

    Args:
        initializer: an initializer, a callable, or None.

    Returns:
        `{'module': 'keras.initializers', 'class_name', 'config',
        'registered_name': None}`; callables (wrapped or not) give
        `{'module', 'class_name': 'function', 'config': qualname,
        'registered_name': qualname}`, which `get` refuses to deserialize.

    Raises:
        TypeError: if `initializer` is neither an initializer nor callable.
    """
    return registry.serialize(initializer, "keras.initializers", Initializer, _CallableInitializer)


def get(identifier, arg_name="initializer"):
    """Resolves an initializer identifier, like `keras.initializers.get`.

    Args:
        identifier: None; a Keras name ("glorot_uniform", "GlorotUniform",
            "normal", ...; case-sensitive as in Keras); a serialized dict; an
            instance or class of ours or of Keras (matched by class name and
            `get_config()`); or any callable `fn(shape, dtype=None)`.
        arg_name: argument name used in the error message.

    Returns:
        An `Initializer` (other callables wrapped), or None.

    Raises:
        ValueError: if the identifier cannot be interpreted.

    Example:

    >>> get("glorot_uniform").get_config()
    {'seed': None, 'input_axes': None, 'output_axes': None}
    """
    return registry.resolve(identifier, ALL_OBJECTS_DICT, Initializer, _CallableInitializer,
                    "initializer", arg_name)

"""Keras 3 weight regularizers (L1, L2, L1L2) for torch tensors.

Names, defaults, numerics and configs follow `keras.regularizers`. Each
regularizer has an `additive` flag: True when the penalty of a weight equals
the sum of the penalties of disjoint shards of it (all built-ins), so a
tensor-parallel layer may sum per-shard penalties instead of gathering the
weight; False for arbitrary callables, whose penalty needs the full weight.
"""

from __future__ import annotations

import math

import torch

from dist_mha.keras_objects import registry


def _validate(value, name):
    # Keras's validate_float_arg, same message.
    if (not isinstance(value, (float, int)) or math.isinf(value) or math.isnan(value)
            or value < 0):
        raise ValueError(f"Invalid value for argument {name}: expected a non-negative float."
                         f"Received: {name}={value}")
    return float(value)


class Regularizer(registry.KerasObject):
    """Base class: `reg(x)` returns a scalar penalty tensor of `x.dtype`."""

    additive = True

    def __call__(self, x):
        return torch.zeros((), dtype=x.dtype, device=x.device)


class L1L2(Regularizer):
    """Penalty `l1 * sum(|x|) + l2 * sum(x**2)`.

    Args:
        l1: non-negative float (None means 0).
        l2: non-negative float (None means 0).

    Returns:
        Called on a tensor, a scalar tensor of the same dtype.

    Raises:
        ValueError: if a factor is negative, inf, NaN or not a number.

    Example:

    >>> L1L2(l1=0.5, l2=0.25)(torch.ones(2, 2))
    tensor(3.)
    """

    def __init__(self, l1=0.0, l2=0.0):
        self.l1 = _validate(0.0 if l1 is None else l1, "l1")
        self.l2 = _validate(0.0 if l2 is None else l2, "l2")

    def __call__(self, x):
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        # Terms with a zero factor are skipped, as Keras does (so inf/NaN
        # weights do not leak into a disabled term).
        if self.l1 != 0.0:
            out = out + self.l1 * torch.sum(torch.abs(x))
        if self.l2 != 0.0:
            out = out + self.l2 * torch.sum(torch.square(x))
        return out

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


class L1(Regularizer):
    """Penalty `l1 * sum(|x|)`.

    Keras keeps `l1` as a float32 tensor, so the factor (and the config) is
    the float32 rounding of the value given; this class does the same.

    Args:
        l1: non-negative float (None means 0.01).

    Raises:
        ValueError: if `l1` is negative, inf, NaN or not a number.

    Example:

    >>> L1(0.5)(torch.ones(2, 2))
    tensor(2.)
    """

    def __init__(self, l1=0.01):
        l1 = _validate(0.01 if l1 is None else l1, "l1")
        self.l1 = torch.tensor(l1, dtype=torch.float32).item()

    def __call__(self, x):
        return self.l1 * torch.sum(torch.abs(x))

    def get_config(self):
        return {"l1": self.l1}


class L2(Regularizer):
    """Penalty `l2 * sum(x**2)`.

    Args:
        l2: non-negative float (None means 0.01).

    Raises:
        ValueError: if `l2` is negative, inf, NaN or not a number.

    Example:

    >>> L2(0.5)(torch.ones(2, 2))
    tensor(2.)
    """

    def __init__(self, l2=0.01):
        self.l2 = _validate(0.01 if l2 is None else l2, "l2")

    def __call__(self, x):
        return self.l2 * torch.sum(torch.square(x))

    def get_config(self):
        return {"l2": self.l2}


class _CallableRegularizer(Regularizer):
    """Wraps `fn(x) -> scalar`; not additive, so it must see the full weight."""

    additive = False

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return torch.as_tensor(self.fn(x))

    def __repr__(self):
        return f"_CallableRegularizer({self.fn!r})"


class _L1L2Documented:
    # Keras documents "l1_l2" as L1L2(l1=0.01, l2=0.01) (the Keras 2 name);
    # Keras 3's own table lacks it and maps "l1l2" to L1L2() (both zero).
    @staticmethod
    def from_config(config):
        return L1L2(**{"l1": 0.01, "l2": 0.01, **config})


_CLASSES = [L1, L2, L1L2]
ALL_OBJECTS_DICT = {**{c.__name__: c for c in _CLASSES}, **{registry.snake_case(c.__name__): c for c in _CLASSES},
                    "l1_l2": _L1L2Documented}


def serialize(regularizer):
    """Returns Keras's serialized dict of `regularizer` (None gives None).

    Args:
        regularizer: a regularizer, a callable, or None.

    Returns:
        `{'module': 'keras.regularizers', 'class_name', 'config',
        'registered_name': None}`; callables give `{'module', 'class_name':
        'function', 'config': qualname, 'registered_name': qualname}`, which
        `get` refuses to deserialize.

    Raises:
        TypeError: if `regularizer` is neither a regularizer nor callable.
    """
    return registry.serialize(regularizer, "keras.regularizers", Regularizer, _CallableRegularizer)


def get(identifier, arg_name="regularizer"):
    """Resolves a regularizer identifier, like `keras.regularizers.get`.

    Args:
        identifier: None; a Keras name ("l1", "L1", "l2", "L2", "l1l2",
            "L1L2"), or "l1_l2" (the name Keras documents, giving
            `L1L2(l1=0.01, l2=0.01)` as its docstring says); a serialized
            dict; an instance or class of ours or of Keras (matched by class
            name and `get_config()`); or any callable `fn(x) -> scalar`.
        arg_name: argument name used in the error message.

    Returns:
        A `Regularizer` (other callables wrapped, `additive=False`), or None.

    Raises:
        ValueError: if the identifier cannot be interpreted.

    Example:

    >>> get("l2").get_config()
    {'l2': 0.01}
    """
    return registry.resolve(identifier, ALL_OBJECTS_DICT, Regularizer, _CallableRegularizer,
                    "regularizer", arg_name)

"""Keras 3 weight constraints, usable on a weight sharded across ranks.

Names, defaults, formulas and configs follow `keras.constraints`. The norm
constraints take `allreduce_sum`: the per-shard sum of squares along `axis`
goes through it before the square root. A weight sharded along a dim NOT in
`axis` needs no communication (pass nothing: every norm is local); one
sharded along a dim IN `axis` passes an all-reduce-sum so each rank sees the
global norm. `needs_norm` and `axis` let the layer tell the two cases apart.
"""

from __future__ import annotations

import torch

from dist_mha.keras_objects import registry

# keras.backend.epsilon() default; Keras adds it to the norm, not the square.
_EPSILON = 1e-7


class Constraint(registry.KerasObject):
    """Base class: `c(w, *, allreduce_sum=None)` returns the projected weight.

    Attributes:
        needs_norm: True when the result depends on norms along `axis`.
        axis: the norm axes (int, tuple/list, or None for all axes).
    """

    needs_norm = False
    axis = None

    def __call__(self, w, *, allreduce_sum=None):
        return w

    def _norms(self, w, allreduce_sum):
        axis = tuple(range(w.ndim)) if self.axis is None else self.axis
        sq = torch.sum(torch.square(w), dim=axis, keepdim=True)
        if allreduce_sum is not None:
            sq = allreduce_sum(sq)
        return torch.sqrt(sq)



class MaxNorm(Constraint):
    """Scales each slice along `axis` down to a norm of at most `max_value`.

    `w * clip(norm, 0, max_value) / (epsilon + norm)`, as Keras.

    Args:
        max_value: maximum norm.
        axis: int or tuple/list of ints (negatives allowed) to take norms
            over, e.g. 0 for the input dim of a `(input, units)` kernel.

    Returns:
        Called as `c(w, allreduce_sum=None)`, the projected tensor.

    Example:

    >>> MaxNorm(1.0)(torch.tensor([[3.0], [4.0]])).flatten()
    tensor([0.6000, 0.8000])
    """

    needs_norm = True

    def __init__(self, max_value=2, axis=0):
        self.max_value, self.axis = max_value, axis

    def __call__(self, w, *, allreduce_sum=None):
        norms = self._norms(w, allreduce_sum)
        desired = torch.clamp(norms, 0, self.max_value)
        return w * (desired / (_EPSILON + norms))

    def get_config(self):
        return {"max_value": self.max_value, "axis": self.axis}


class MinMaxNorm(Constraint):
    """Moves each slice's norm into `[min_value, max_value]` at speed `rate`.

    The new norm is `rate * clip(norm, min, max) + (1 - rate) * norm`, as
    Keras; `rate=1` enforces the bounds strictly.

    Args:
        min_value: minimum norm. max_value: maximum norm.
        rate: enforcement rate in [0, 1].
        axis: norm axes, as in `MaxNorm`.

    Example:

    >>> MinMaxNorm(1.0, 2.0)(torch.tensor([[0.3], [0.4]])).flatten()
    tensor([0.6000, 0.8000])
    """

    needs_norm = True

    def __init__(self, min_value=0.0, max_value=1.0, rate=1.0, axis=0):
        self.min_value, self.max_value, self.rate, self.axis = min_value, max_value, rate, axis

    def __call__(self, w, *, allreduce_sum=None):
        norms = self._norms(w, allreduce_sum)
        desired = (self.rate * torch.clamp(norms, self.min_value, self.max_value)
                   + (1 - self.rate) * norms)
        return w * (desired / (_EPSILON + norms))

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value, "rate": self.rate,
                "axis": self.axis}


class NonNeg(Constraint):
    """Sets negative weights to 0 (elementwise, so any sharding is fine).

    Example:

    >>> NonNeg()(torch.tensor([-1.0, 2.0]))
    tensor([0., 2.])
    """

    def __call__(self, w, *, allreduce_sum=None):
        return torch.clamp(w, min=0)


class UnitNorm(Constraint):
    """Scales each slice along `axis` to unit norm: `w / (epsilon + norm)`.

    Args:
        axis: norm axes, as in `MaxNorm`.

    Example:

    >>> UnitNorm()(torch.tensor([[3.0], [4.0]])).flatten()
    tensor([0.6000, 0.8000])
    """

    needs_norm = True

    def __init__(self, axis=0):
        self.axis = axis

    def __call__(self, w, *, allreduce_sum=None):
        return w / (_EPSILON + self._norms(w, allreduce_sum))

    def get_config(self):
        return {"axis": self.axis}


class _CallableConstraint(Constraint):
    """Wraps `fn(w) -> w`. Its dependence on other elements is unknown, so it
    reports `needs_norm=True, axis=None` (every axis) and refuses shards."""

    needs_norm = True

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, w, *, allreduce_sum=None):
        if allreduce_sum is not None:
            raise ValueError(f"Constraint {self.fn!r} is an arbitrary callable and cannot be "
                             "applied shard by shard; apply it to the gathered weight.")
        return torch.as_tensor(self.fn(w))

    def __repr__(self):
        return f"_CallableConstraint({self.fn!r})"


_CLASSES = [MaxNorm, MinMaxNorm, NonNeg, UnitNorm]
ALL_OBJECTS_DICT = {**{c.__name__: c for c in _CLASSES}, **{registry.snake_case(c.__name__): c for c in _CLASSES}}


def serialize(constraint):
    """Returns Keras's serialized dict of `constraint` (None gives None).

    Args:
        constraint: a constraint, a callable, or None.

    Returns:
        `{'module': 'keras.constraints', 'class_name', 'config',
        'registered_name': None}`; callables give `{'module', 'class_name':
        'function', 'config': qualname, 'registered_name': qualname}`, which
        `get` refuses to deserialize.

    Raises:
        TypeError: if `constraint` is neither a constraint nor callable.
    """
    return registry.serialize(constraint, "keras.constraints", Constraint, _CallableConstraint)


def get(identifier, arg_name="constraint"):
    """Resolves a constraint identifier, like `keras.constraints.get`.

    Args:
        identifier: None; a Keras name ("max_norm", "MaxNorm",
            "min_max_norm", "non_neg", "unit_norm", ...); a serialized dict;
            an instance or class of ours or of Keras (matched by class name
            and `get_config()`); or any callable `fn(w) -> w`.
        arg_name: argument name used in the error message.

    Returns:
        A `Constraint` (other callables wrapped), or None.

    Raises:
        ValueError: if the identifier cannot be interpreted.

    Example:

    >>> get("max_norm").get_config()
    {'max_value': 2, 'axis': 0}
    """
    return registry.resolve(identifier, ALL_OBJECTS_DICT, Constraint, _CallableConstraint,
                    "constraint", arg_name)

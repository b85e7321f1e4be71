"""Arguments of the attention layers and the engine: checks and normalisation.

Every error names the argument, the value received, what was expected and,
where it is not obvious, how to fix it, in Keras's wording.
"""

from __future__ import annotations

import torch

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "half": torch.float16,
    "float": torch.float32,
    "double": torch.float64,
}


def _invalid(name: str, expected: str, value) -> ValueError:
    return ValueError(
        f"Received an invalid value for argument `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


def positive_int(name: str, value, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        expected = "a positive integer" + (" or `None`" if allow_none else "")
        raise _invalid(name, expected, value)
    return value


def positive_float(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise _invalid(name, "a positive finite number" + (" or `None`" if allow_none else ""), value)
    return float(value)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise _invalid(name, "a boolean (True or False)", value)
    return value


def dropout_rate(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise _invalid("dropout", "a float in [0, 1)", value)
    return float(value)


def output_shape(value):
    """None, an int or a sequence of positive ints -> None or a tuple (Keras keeps tuples)."""
    if value is None:
        return None
    dims = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        dims = tuple(dims)
    except TypeError:
        dims = None
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
        # Keras's own phrase first (its tests match it), then ours.
        raise ValueError(
            f"Invalid `output_shape`: {value!r}. When specified, the `output_shape` should be of type "
            "tuple, list, or int. Received an invalid value for argument `output_shape`, expected an int, "
            f"a tuple or a list of positive ints. Received: output_shape={value!r}"
        )
    return dims


def attention_axes(value):
    """None, an int or a sequence of ints; resolved against the input rank at build."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(a, int) and not isinstance(a, bool) for a in value
    ):
        return tuple(value)
    raise ValueError(
        "`attention_axes` must be an int, list, or tuple. Received an invalid value for argument "
        "`attention_axes`, expected None, an int, or a non-empty list/tuple of ints. "
        f"Received: attention_axes={value!r}"
    )


def flash_attention(value):
    if value not in (None, True, False) or (value is not None and not isinstance(value, bool)):
        raise _invalid("flash_attention", "None, True or False", value)
    return value


def seed(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid("seed", "None or a non-negative integer", value)
    return value


def attention_backend(value):
    from dist_mha.attention.kernels import BACKENDS

    if value is not None and value not in BACKENDS:
        raise _invalid("attention_backend", f"None or one of {sorted(BACKENDS)}", value)
    return value


_MIXED = {"mixed_float16": torch.float16, "mixed_bfloat16": torch.bfloat16}


def _policy_name(value):
    if isinstance(value, dict):
        return value.get("config", {}).get("name", value.get("name"))
    if hasattr(value, "variable_dtype"):  # a real Keras DTypePolicy
        return getattr(value, "name", value.variable_dtype)
    return value


def param_dtype(value) -> torch.dtype:
    """Keras dtype (policy name, policy config dict) or torch dtype -> the weights' torch dtype.

    Mixed policies (`"mixed_bfloat16"`) keep float32 weights, as in Keras (see
    `compute_dtype`); otherwise the compute dtype follows the inputs.
    """
    if value is None:
        return torch.get_default_dtype()
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise _invalid("dtype", "a floating dtype", value)
        return value
    name = _policy_name(value)
    if isinstance(name, str):
        if name in _MIXED:
            return torch.float32
        if name in _DTYPES:
            return _DTYPES[name]
    raise _invalid("dtype", f"a torch floating dtype, one of {sorted(_DTYPES)}, or a Keras dtype policy", value)


def compute_dtype(value):
    """The compute dtype of a Keras mixed policy (`"mixed_bfloat16"` -> bfloat16), else None.

    As Keras does, a layer with a mixed policy casts its floating inputs to
    this dtype, uses its float32 weights cast to it, and returns it.
    """
    if value is None or isinstance(value, torch.dtype):
        return None
    return _MIXED.get(_policy_name(value))


def policy_config(param: torch.dtype, compute) -> dict:
    """The Keras serialisation of the layer's dtype policy (mixed when `compute` is set)."""
    if compute is None:
        return dtype_policy_config(param)
    name = next(n for n, d in _MIXED.items() if d == compute)
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": name}, "registered_name": None}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_policy_config(dtype: torch.dtype) -> dict:
    """The Keras serialisation of a plain dtype policy."""
    return {
        "module": "keras",
        "class_name": "DTypePolicy",
        "config": {"name": dtype_name(dtype)},
        "registered_name": None,
    }


def shape_tuple(name: str, shape) -> tuple:
    """A shape given as a sequence of ints/None, as a tuple (output-shape computations take any rank)."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise _invalid(name, "a shape tuple such as (batch, seq, features)", shape)
    return tuple(shape)


def input_shape(name: str, shape) -> tuple:
    """A build shape: sequence of ints/None, rank >= 3, known feature dim."""
    received = shape
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (None, None, shape)
    if isinstance(shape, str):
        raise _invalid(name, "a shape tuple such as (batch, seq, features)", received)
    try:
        shape = tuple(shape)
    except TypeError:
        raise _invalid(name, "a shape tuple such as (batch, seq, features)", received) from None
    if len(shape) < 3 or any(d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0) for d in shape):
        raise _invalid(name, "a shape of rank >= 3 (batch, ..., features) with ints or None", received)
    if shape[-1] is None or shape[-1] <= 0:
        raise _invalid(name, "a shape whose last (feature) dim is a known positive int", received)
    return shape


def process_group(name: str, group):
    """None, or a torch.distributed process group this process belongs to."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"Received `{name}`={group!r} but torch.distributed is not initialised; call "
            "init_process_group first (torchrun does it via dist_mha.parallel.build_parallel_state)."
        )
    try:
        size = dist.get_world_size(group)
        rank = dist.get_rank(group)
    except Exception as err:  # not a ProcessGroup, or not a member
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected a torch.distributed "
            f"ProcessGroup that this rank belongs to, or None. Received: {name}={group!r}"
        ) from err
    if rank < 0 or size < 1:
        raise ValueError(f"This rank is not a member of `{name}`={group!r}; pass the group of this rank.")
    return group

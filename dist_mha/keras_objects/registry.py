"""Keras's object registries: name lookup, `get()` and `serialize()` rules.

Shared by `initializers`, `regularizers` and `constraints`, which each pass
their own name table, base class and callable wrapper.
"""

from __future__ import annotations

import inspect
import re


def snake_case(name):
    # keras.src.utils.naming.to_snake_case, which builds Keras's name tables.
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", re.sub(r"\W+", "", name))
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def serialize(obj, module, base, wrapper):
    """Keras's `serialize_keras_object` format, shared by the three registries."""
    if obj is None:
        return None
    obj = obj.fn if isinstance(obj, wrapper) else obj
    if isinstance(obj, base):
        return {"module": module, "class_name": type(obj).__name__,
                "config": obj.get_config(), "registered_name": None}
    if callable(obj):
        name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        return {"module": getattr(obj, "__module__", None) or type(obj).__module__,
                "class_name": "function", "config": name, "registered_name": name}
    raise TypeError(f"Cannot serialize {obj!r}: it is neither a {base.__name__} nor callable.")


def resolve(identifier, table, base, wrapper, kind, arg_name):
    """The `get()` logic shared by the three registries (see `get`)."""
    if identifier is None or isinstance(identifier, base):
        return identifier
    cls, config = None, {}
    if isinstance(identifier, str):
        cls = table.get(identifier)
    elif isinstance(identifier, dict):
        if identifier.get("class_name") == "function":
            raise ValueError(f"Received an invalid value for argument `{arg_name}`: a serialized "
                             "plain callable cannot be deserialized; pass the callable itself. "
                             f"Received: {arg_name}={identifier!r}")
        name = identifier.get("class_name")
        cls, config = table.get(name) if isinstance(name, str) else None, identifier.get("config")
    elif inspect.isclass(identifier):
        cls = table.get(identifier.__name__)
        if cls is None and callable(identifier):
            obj = identifier()  # Keras also instantiates classes it is given
            if callable(obj):
                return wrapper(obj)
    elif type(identifier).__name__ in table and callable(getattr(identifier, "get_config", None)):
        # A Keras object (or look-alike): rebuild ours from its config.
        cls, config = table[type(identifier).__name__], identifier.get_config()
    elif callable(identifier):
        return wrapper(identifier)
    if cls is None or not isinstance(config or {}, dict):
        raise ValueError(
            f"Received an invalid value for argument `{arg_name}`, expected one of "
            f"{sorted(table)}, a serialized {kind} dict, a {kind} instance or a callable. "
            f"Received: {arg_name}={identifier!r}")
    return cls.from_config(config or {})


class KerasObject:
    """`get_config` / `from_config` / `repr` as Keras's initializers, regularizers and constraints have them."""

    def get_config(self):
        """Returns the config dict, with Keras's keys."""
        return {}

    @classmethod
    def from_config(cls, config):
        """Builds the object from `get_config()` output."""
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

"""Keras's initializers, regularizers and constraints, by name, config or object."""

"""Shared pytest setup.

Keras is only a test oracle here; it must run on its torch backend, and the
backend is chosen at import time, so the variable is set before any test
module imports keras.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

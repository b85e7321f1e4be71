"""Plans read from mask values on the host, cached by the masks' identity.

Varlen's sequence plan and flash-attn's unpadding indices come from the
masks' values: a host read, free on CPU, a device synchronisation on CUDA.
The layers of one forward pass see the same mask tensors, so a plan is
keyed by the tensors' identity and version (an in-place change makes a new
plan) and checked through weak references (a recycled `id()` of a new
tensor never matches an old plan). Inference tensors have no version
counter, so their plans are not cached: they are made per call.
"""

from __future__ import annotations

import weakref

_PLANS: dict = {}
MAX_PLANS = 16


def cached(kind: str, tensors: tuple, extra: tuple, make):
    """`make()`, reused while `tensors` (None allowed) are the same objects at the same version."""
    if any(t is not None and t.is_inference() for t in tensors):
        return make()
    key = (kind, *(None if t is None else (id(t), t._version) for t in tensors), *extra)
    hit = _PLANS.get(key)
    if hit is not None and all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(hit[0], tensors)):
        return hit[1]
    result = make()
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = (tuple(None if t is None else weakref.ref(t) for t in tensors), result)
    return result

"""Which activation-checkpoint region a dropout stream is drawing in, so that recomputation replays it.

torch's non-reentrant `torch.utils.checkpoint` (which `checkpoint_wrapper`
and the composable `checkpoint` use) runs a region's forward under a
saved-tensor hook that holds the region's `_CheckpointFrame`, and runs its
recomputation, inside backward, under another hook that refers to the same
frame. It restores torch's default generators for the recomputation, but
not ours. So a stream records its state the first time it draws in a
region's forward (`remember`), and when that region is recomputed it draws
again from that state (`recall`), then goes back to where it was.

`current()` reads the innermost saved-tensor hook. These are torch
internals; if they change, `current()` returns None and a stream used during
recomputation raises `RecomputeError` as before instead of drawing other masks.
"""

from __future__ import annotations

import weakref

import torch

FORWARD, RECOMPUTE = "forward", "recompute"

# frame -> {id(stream): the stream's state before its first draw in that region's forward}
_SNAPSHOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _closure(fn) -> dict:
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    try:
        return {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__)}
    except ValueError:  # an empty cell
        return {}


def current():
    """`(FORWARD, frame, None)`, `(RECOMPUTE, frame, graph id)` or None (not in a checkpointed region)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return None
    cells = _closure(hooks[0])
    frame = cells.get("frame")
    if frame is not None and type(frame).__name__ == "_CheckpointFrame":
        return FORWARD, frame, None
    ref = cells.get("target_frame_ref")
    if isinstance(ref, weakref.ReferenceType):
        frame = ref()
        if frame is not None and type(frame).__name__ == "_CheckpointFrame":
            return RECOMPUTE, frame, cells.get("gid")
    return None


def remember(frame, stream) -> None:
    """Records `stream`'s state at its first draw in `frame`'s forward."""
    snaps = _SNAPSHOTS.setdefault(frame, {})
    if id(stream) not in snaps:
        snaps[id(stream)] = stream.snapshot()


def recall(frame, stream):
    """`stream`'s state at its first draw in `frame`'s forward, or None when it did not draw there."""
    return _SNAPSHOTS.get(frame, {}).get(id(stream))

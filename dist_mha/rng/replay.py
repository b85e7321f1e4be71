"""Which activation-checkpoint region a dropout stream is drawing in, so that recomputation replays it.

torch's non-reentrant `torch.utils.checkpoint` (which `checkpoint_wrapper`
and the composable `checkpoint` use) runs a region's forward under a
saved-tensor hook that holds the region's `_CheckpointFrame`, and runs its
recomputation, inside backward, under another hook that refers to the same
frame. It restores torch's default generators for the recomputation, but
not ours. So a stream records its state the first time it draws in a
region's forward (`remember`), and when that region is recomputed it draws
again from that state (`recall`), then goes back to where it was.

`Replayable` is the streams' side of it (`RNGStream`, `CallCounter`).
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


class RecomputeError(RuntimeError):
    """A dropout stream was used to recompute a forward without replaying it."""


class Replayable:
    """A stream's part in activation checkpointing: recomputed regions draw what their forward drew.

    `_draw()` runs before every draw. In a checkpointed region's forward it
    records the state at the region's first draw (`replay.remember`); in that
    region's recomputation it puts that state back for the recomputation's
    draws (keeping the live state aside), and the next draw outside it
    returns to the live state. `dist_mha.rng.streams.checkpoint` replays
    explicitly (`_replaying`). Anything else that draws during a backward pass
    (a reentrant checkpoint, DeepSpeed's) raises `RecomputeError`.
    """

    _live = None  # the state a recomputation set aside
    _recompute_key = None  # (frame, graph) of the recomputation the stream is replaying

    def _draw(self) -> None:
        if self._replaying or torch.compiler.is_compiling():
            return
        where = current()
        if where is not None and where[0] == RECOMPUTE:
            _, frame, graph = where
            if self._recompute_key != (id(frame), graph):
                snap = recall(frame, self)
                if snap is None:
                    raise RecomputeError(
                        f"The dropout stream {self.name!r} drew while a checkpointed region was recomputed, but "
                        "not in that region's forward: the recomputation does not repeat the forward, so its "
                        "masks cannot be replayed. Keep dropout settings equal between forward and backward.")
                if self._live is None:
                    self._live = self._snapshot()
                self._restore(snap)
                self._recompute_key = (id(frame), graph)
            return
        self._settle()
        if torch._C._current_graph_task_id() != -1:
            raise RecomputeError(
                f"The dropout stream {self.name!r} was used during a backward pass outside a replayable "
                "recomputation: an activation checkpoint that re-runs the forward inside backward "
                "(torch.utils.checkpoint with use_reentrant=True, DeepSpeed's checkpoint) would draw different "
                "masks than the forward did, silently corrupting the gradients. Use torch.utils.checkpoint with "
                "use_reentrant=False (or checkpoint_wrapper / torch.distributed._composable.checkpoint), which "
                "dist_mha replays, or dist_mha.rng.streams.checkpoint(fn, *args, streams=collect_streams(module)); "
                "or set dropout to 0 inside the checkpointed region.")
        if where is not None:
            remember(where[1], self)

    def _settle(self) -> None:
        """Back to the live state after a recomputation replayed an earlier one."""
        if self._recompute_key is not None:
            self._restore(self._live)
            self._live = self._recompute_key = None

    def snapshot(self):
        """The stream's state (a copy), as live code sees it."""
        where = current()
        if where is None or where[0] != RECOMPUTE:
            self._settle()
        return self._snapshot()

    def restore(self, snap) -> None:
        """Puts the state back to `snap`."""
        self._live = self._recompute_key = None
        self._restore(snap)

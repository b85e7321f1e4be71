"""Named RNG streams for dropout, with fork semantics and checkpoint support.

A stream owns a generator state per device. `fork(device)` swaps that state
into torch's default generator for the duration of a block (so kernels that
draw from the default generator, like SDPA's and flash-attn's dropout, use
the stream), then stores the advanced state and restores the global one.
This is the idea of Megatron's RNG tracker, without its module globals.

Under tensor parallelism a layer keeps two kinds of stream:
- per-TP-rank (`attention_dropout`): seeded with the TP rank mixed in, so the
  heads of different ranks get independent masks;
- replicated (`replicated`): the same on every TP rank, for randomness on
  tensors every rank holds in full (residual dropout in a block).

`CallCounter` keys the TP-invariant dropout mode, whose masks are a pure
function of (seed, call index, global element index).

`checkpoint` wraps `torch.utils.checkpoint` so that recomputation replays the
streams from the states they had in the original forward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint

from dist_mha.core.counter_rng import mix64, uniform


def stream_seed(seed: int, name: str, rank: int | None = None) -> int:
    """A 63-bit seed for stream `name` (and TP rank, for per-rank streams)."""
    parts = [int.from_bytes(name.encode()[i : i + 8].ljust(8, b"\0"), "little") for i in range(0, len(name.encode()), 8)]
    extra = [] if rank is None else [0x7470_7261_6E6B, rank]
    return mix64(seed, *parts, *extra) & ((1 << 63) - 1)


class RNGStream:
    """A reproducible random stream.

    Args:
        seed: integer seed of the stream (see `stream_seed`).
        name: a label for errors and checkpoints.

    Example:

    >>> stream = RNGStream(seed=3, name="attention_dropout")
    >>> with stream.fork(torch.device("cpu")):
    ...     mask = torch.rand(4) > 0.5
    """

    def __init__(self, seed: int, name: str = "default"):
        self.seed = int(seed)
        self.name = name
        self._states: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def fork(self, device):
        device = torch.device(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            with torch.random.fork_rng(devices=[index], device_type="cuda"), torch.cuda.device(index):
                key = f"cuda:{index}"
                if key in self._states:
                    torch.cuda.set_rng_state(self._states[key])
                else:
                    torch.cuda.manual_seed(self.seed)
                yield
                self._states[key] = torch.cuda.get_rng_state()
        else:
            with torch.random.fork_rng(devices=[]):
                if "cpu" in self._states:
                    torch.set_rng_state(self._states["cpu"])
                else:
                    torch.random.default_generator.manual_seed(self.seed)
                yield
                self._states["cpu"] = torch.get_rng_state()

    def snapshot(self):
        return dict(self._states)

    def restore(self, snap) -> None:
        self._states = dict(snap)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "states": dict(self._states)}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._states = dict(state["states"])


class CallCounter:
    """Counts calls; the TP-invariant dropout masks are keyed by it."""

    def __init__(self, seed: int, name: str = "invariant_dropout"):
        self.seed = int(seed)
        self.name = name
        self.count = 0

    def next(self) -> int:
        self.count += 1
        return self.count - 1

    def snapshot(self):
        return self.count

    def restore(self, snap) -> None:
        self.count = snap

    def state_dict(self) -> dict:
        return {"seed": self.seed, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.count = int(state["seed"]), int(state["count"])


def invariant_keep_mask(seed: int, call: int, global_shape, index, rate: float, device) -> torch.Tensor:
    """Dropout keep-mask for a block of a global `(B, N, T, S)` probability tensor.

    Each element is kept iff its counter-based uniform (keyed by seed, call
    index and global element index) is >= `rate`, so the mask of every head
    is the same whatever the TP degree.
    """
    return uniform(mix64(seed, call), global_shape, index, device=device) >= rate


def collect_streams(module: torch.nn.Module) -> list:
    """Every stream/counter owned by `module` and its children (via `rng_streams()`)."""
    out = []
    for m in module.modules():
        fn = getattr(m, "rng_streams", None)
        if callable(fn):
            out.extend(fn())
    return out


def checkpoint(function, *args, streams, **kwargs):
    """`torch.utils.checkpoint` that replays dist_mha RNG streams on recompute.

    Args:
        function: the function to checkpoint.
        *args: its arguments.
        streams: the streams it uses, e.g. `collect_streams(block)`.
        **kwargs: passed to `torch.utils.checkpoint.checkpoint`.

    Example:

    >>> y = checkpoint(block, x, streams=collect_streams(block))
    """
    snaps = {}

    @contextlib.contextmanager
    def forward_ctx():
        snaps.update({id(s): s.snapshot() for s in streams})
        yield

    @contextlib.contextmanager
    def recompute_ctx():
        after = {id(s): s.snapshot() for s in streams}
        for s in streams:
            s.restore(snaps[id(s)])
        try:
            yield
        finally:
            for s in streams:
                s.restore(after[id(s)])

    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=lambda: (forward_ctx(), recompute_ctx()), **kwargs
    )

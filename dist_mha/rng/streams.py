"""Named RNG streams for dropout, with fork semantics and checkpoint support.

A stream owns one `torch.Generator` per device. Kernels draw dropout from
torch's default generator (SDPA's, flash-attn's, `F.dropout`), so
`fork(device)` points that generator at the stream's for the block: on CUDA
with `graphsafe_set_state` (a pointer swap, no state copy, legal during
CUDA-graph capture: register the stream generators with the graph,
`graph.register_generator_state(gen)` for each of `generators(model, device)`),
elsewhere by copying the states in and out. This is the idea of Megatron's
RNG tracker, without its module globals.

Under `torch.compile` any RNG state swap (and any op given a generator)
breaks the graph, and inductor draws a graph's random numbers from seeds it
takes at the graph's start, so a swap inside a graph could not work anyway.
There `dropout` draws its keep mask from a counter-based hash instead
(`traced_uniform`: splitmix64 of the stream's seed and a per-device offset
tensor that advances in the graph): no graph break, reproducible, but not
the mask eager mode draws. Kernels that can only use the default generator
(SDPA and flash-attn dropout on CUDA) still fork, at a graph break.

Under tensor parallelism a layer keeps two kinds of stream:
- per-TP-rank (`attention_dropout`): seeded with the TP rank mixed in, so the
  heads of different ranks get independent masks;
- replicated (`replicated`): the same on every TP rank, for randomness on
  tensors every rank holds in full (residual dropout in a block).

`CallCounter` keys the TP-invariant dropout mode, whose masks are a pure
function of (seed, call index, global element index).

Activation checkpointing: a non-reentrant `torch.utils.checkpoint` (also
under `checkpoint_wrapper` and the composable `checkpoint`) recomputes a
region inside backward; each stream notices that (`dist_mha.rng.replay`)
and draws from the state it had in that region's forward, so the masks and
gradients are those without checkpointing. `checkpoint` does the same with
explicit snapshots. A recomputation that cannot be matched to its forward
(reentrant checkpoints, DeepSpeed's) raises `RecomputeError` instead of
drawing other masks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from dist_mha.rng.counter import _bits, _srl, mix64
from dist_mha.rng.generators import canonical_device as _canonical
from dist_mha.rng.generators import use_generator
from dist_mha.rng.replay import RecomputeError, Replayable  # noqa: F401  (RecomputeError: public here too)


def stream_seed(seed: int, name: str, rank: int | None = None) -> int:
    """A 63-bit seed for stream `name` (and TP rank, for per-rank streams)."""
    parts = [int.from_bytes(name.encode()[i : i + 8].ljust(8, b"\0"), "little") for i in range(0, len(name.encode()), 8)]
    extra = [] if rank is None else [0x7470_7261_6E6B, rank]
    return mix64(seed, *parts, *extra) & ((1 << 63) - 1)


_COUNTER = "counter:"  # state-dict key prefix of the compiled-mode counters


class RNGStream(Replayable):
    """A reproducible random stream: one `torch.Generator` per device.

    Args:
        seed: integer seed of the stream (see `stream_seed`).
        name: a label for errors and checkpoints.

    Example:

    >>> stream = RNGStream(seed=3, name="attention_dropout")
    >>> mask = torch.rand(4, generator=stream.generator("cpu")) > 0.5
    >>> with stream.fork("cpu"):              # for code that uses the default generator
    ...     other = torch.rand(4) > 0.5
    """

    def __init__(self, seed: int, name: str = "default"):
        self.seed = int(seed)
        self.name = name
        self._gens: dict[str, torch.Generator] = {}
        self._pending: dict[str, torch.Tensor] = {}  # loaded states of devices not used yet
        self._offsets: dict[str, torch.Tensor] = {}  # compiled-mode counters (see `traced_uniform`)
        self._replaying = False

    def generator(self, device) -> torch.Generator:
        """This stream's generator on `device`, created (seeded, or from a loaded state) on first use.

        Raises:
            RecomputeError: when called during a backward pass outside `checkpoint`'s replay.
        """
        self._draw()
        device = _canonical(device)
        key = str(device)
        gen = self._gens.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            if key in self._pending:
                gen.set_state(self._pending.pop(key))
            else:
                gen.manual_seed(self.seed)
            self._gens[key] = gen
        return gen

    @contextlib.contextmanager
    def fork(self, device):
        """Torch's default generator on `device` draws from this stream inside the block."""
        with use_generator(self.generator(device)):
            yield

    def traced_uniform(self, shape, device) -> torch.Tensor:
        """float32 uniforms in [0, 1) (24 random bits) for traced code, from the stream's counter on `device`.

        Element i of the n drawn is splitmix64(key, offset + i); the offset
        (a 0-d int64 tensor, so compiled graphs advance it without recompiling)
        then moves on by n.
        """
        device = _canonical(device)
        key = str(device)
        offset = self._offsets.get(key)
        if offset is None:
            offset = self._pending.pop(_COUNTER + key, None)
            offset = torch.zeros((), dtype=torch.int64, device=device) if offset is None else offset.to(device)
            self._offsets[key] = offset
        n = 1
        for d in shape:
            n *= int(d)
        flat = torch.arange(n, dtype=torch.int64, device=device).view(tuple(shape)) + offset
        offset.add_(n)
        return _srl(_bits(mix64(self.seed, 0x636F756E746572), flat), 40).to(torch.float32).mul_(2.0**-24)

    def _snapshot(self) -> dict:
        """The state of every device's generator and counter (a copy)."""
        out = {k: v.clone() for k, v in self._pending.items()}
        out.update({k: g.get_state() for k, g in self._gens.items()})
        out.update({_COUNTER + k: t.detach().cpu().clone() for k, t in self._offsets.items()})
        return out

    def _restore(self, snap: dict) -> None:
        """Puts generators and counters back to `snap`, in place (compiled code holds the objects)."""
        self._pending = {k: v for k, v in snap.items() if k not in self._gens and k[len(_COUNTER):] not in self._offsets}
        for key, gen in self._gens.items():
            if key in snap:
                gen.set_state(snap[key])
            else:  # not used when the snapshot was taken: back to the seed
                gen.manual_seed(self.seed)
        for key, offset in self._offsets.items():
            offset.fill_(int(snap.get(_COUNTER + key, 0)))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "states": self.snapshot()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.restore(dict(state["states"]))


def forked(req):
    """For a kernel that draws dropout from torch's default generator: `req.rng.fork(device)` when it has
    dropout and a stream, else nothing."""
    if req.dropout_p > 0 and req.rng is not None:
        return req.rng.fork(req.q_BTNH.device)
    return contextlib.nullcontext()


def dropout(x: torch.Tensor, p: float, stream=None) -> torch.Tensor:
    """Dropout (training mode) drawing from `stream`; from torch's default generator when it is None.

    Eager: `F.dropout` inside `stream.fork`. Traced by `torch.compile`: the
    keep mask is `stream.traced_uniform(...) >= p` (no graph break), the kept
    values scaled by `1 / (1 - p)` as `F.dropout` does.
    """
    if p == 0:
        return x
    if stream is None:
        return F.dropout(x, p, training=True)
    if torch.compiler.is_compiling():
        return x * (stream.traced_uniform(x.shape, x.device) >= p) / (1.0 - p)
    with stream.fork(x.device):
        return F.dropout(x, p, training=True)


class CallCounter(Replayable):
    """Counts calls; the TP-invariant dropout masks are keyed by it."""

    def __init__(self, seed: int, name: str = "invariant_dropout"):
        self.seed = int(seed)
        self.name = name
        self.count = 0
        self._replaying = False

    def next(self) -> int:
        self._draw()
        self.count += 1
        return self.count - 1

    def _snapshot(self):
        return self.count

    def _restore(self, snap) -> None:
        self.count = snap

    def state_dict(self) -> dict:
        return {"seed": self.seed, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.count = int(state["seed"]), int(state["count"])


def collect_streams(module: torch.nn.Module) -> list:
    """Every stream/counter owned by `module` and its children (via `rng_streams()`)."""
    out = []
    for m in module.modules():
        fn = getattr(m, "rng_streams", None)
        if callable(fn):
            out.extend(fn())
    return out


def generators(module: torch.nn.Module, device) -> list:
    """The stream generators of `module` on `device`.

    For CUDA-graph capture of a step with dropout: register each with the
    graph (`graph.register_generator_state(gen)`) before capturing.
    """
    return [s.generator(device) for s in collect_streams(module) if isinstance(s, RNGStream)]


def checkpoint(function, *args, streams=(), **kwargs):
    """`torch.utils.checkpoint` (non-reentrant) that replays dist_mha RNG streams on recompute.

    Plain `torch.utils.checkpoint(..., use_reentrant=False)` replays every
    stream by itself (see `dist_mha.rng.replay.Replayable`); this wrapper replays `streams`
    explicitly from snapshots taken at the region's start.

    Args:
        function: the function to checkpoint.
        *args: its arguments.
        streams: the streams it uses, e.g. `collect_streams(block)` (others are replayed automatically).
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
        for s in streams:
            s._settle()  # a recomputation of another region may have left it replaying
        after = {id(s): s.snapshot() for s in streams}
        for s in streams:
            s.restore(snaps[id(s)])
            s._replaying = True
        try:
            yield
        finally:
            for s in streams:
                s._replaying = False
                s.restore(after[id(s)])

    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=lambda: (forward_ctx(), recompute_ctx()), **kwargs
    )

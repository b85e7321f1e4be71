"""Named RNG streams: dropout randomness that does not touch torch's global RNG.

A stream owns a generator state per device. `fork(device)` swaps that state
into torch's default generator for the duration of a block (so kernels that
draw from the default generator, such as SDPA's and flash-attn's dropout,
use the stream), then stores the advanced state and restores the global one.
This is the idea of Megatron's RNG tracker, without its module globals.
"""

from __future__ import annotations

import contextlib

import torch


def _derive(seed: int, name: str) -> int:
    from dist_mha.counter_rng import mix64

    salt = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
    return mix64(seed, salt) & ((1 << 63) - 1)


class RNGStream:
    """A reproducible random stream seeded from an integer.

    Args:
        seed: integer seed.
        name: stream name; different names give independent streams for the same seed.

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
            fork_kwargs = dict(devices=[index], device_type="cuda")
            key = f"cuda:{index}"
        else:
            index, fork_kwargs, key = None, dict(devices=[]), "cpu"
        with torch.random.fork_rng(**fork_kwargs):
            state = self._states.get(key)
            if device.type == "cuda":
                with torch.cuda.device(index):
                    if state is None:
                        torch.cuda.manual_seed(_derive(self.seed, self.name))
                    else:
                        torch.cuda.set_rng_state(state)
                    yield
                    self._states[key] = torch.cuda.get_rng_state()
            else:
                if state is None:
                    torch.random.default_generator.manual_seed(_derive(self.seed, self.name))
                else:
                    torch.set_rng_state(state)
                yield
                self._states[key] = torch.get_rng_state()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "name": self.name, "states": dict(self._states)}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.name = state["name"]
        self._states = dict(state["states"])

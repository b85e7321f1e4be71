"""Pointing torch's default generator at another `torch.Generator` for a block.

Kernels such as SDPA's and flash-attn's dropout draw only from torch's
default generator of their device; `use_generator` makes that generator draw
from a given one (a dist_mha RNG stream's) inside a block. On CUDA this is
`graphsafe_set_state`, a pointer swap that CUDA-graph capture allows (and no
copy of the state); elsewhere the states are copied in and out.
"""

from __future__ import annotations

import contextlib

import torch


def canonical_device(device) -> torch.device:
    """`device` as a torch.device, with the current CUDA index filled in."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _default_generator(device: torch.device):
    if device.type == "cpu":
        return torch.default_generator
    return torch.get_device_module(device.type).default_generators[device.index]


@contextlib.contextmanager
def use_generator(gen):
    """Inside the block, torch's default generator on `gen.device` draws from `gen` (None: no change).

    CUDA: `graphsafe_set_state` shares `gen`'s state with the default
    generator (no copy, capture-safe; `gen` advances as the kernels draw).
    Elsewhere the states are copied in and out.
    """
    if gen is None:
        yield
        return
    default = _default_generator(canonical_device(gen.device))
    if gen.device.type == "cuda" and hasattr(default, "graphsafe_set_state"):
        saved = default.graphsafe_get_state()
        default.graphsafe_set_state(gen)
        try:
            yield
        finally:
            default.graphsafe_set_state(saved)
        return
    saved = default.get_state()
    default.set_state(gen.get_state())
    try:
        yield
    finally:
        gen.set_state(default.get_state())
        default.set_state(saved)

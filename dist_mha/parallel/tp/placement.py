"""How each parameter is laid out across the TP group: the one declaration a new parameter needs.

A module declares, next to the parameter it creates, how that parameter's
local tensor relates to the global one::

    declare(self, "kernel", shard(1, units=num_heads))   # heads split over TP ranks
    declare(self, "weight", replicate())                  # every rank holds it; its forward makes grads equal
    declare(self, "scale", replicate(partial_grad=True))  # every rank holds it; grads summed over TP

With process groups the declaration is only metadata. With a DeviceMesh
(`tp_group=state.mesh["tp"]`) `dist_mha.parallel.dtensor.distribute` turns
each declared parameter into a DTensor with these placements, so FSDP2, DCP
and `clip_grad_norm_` count it exactly once; the forward still computes on
local tensors.

`units` is how many whole units (heads, features) the sharded dim holds.
With fewer units than TP ranks each unit is held by `tp / units`
consecutive ranks (key/value heads of grouped-query attention): the
DTensor then holds all units `Replicate`d, each rank computes on its own
unit, and the replicas' gradients are summed over TP.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

_ATTR = "_tp_placements"


@dataclass(frozen=True)
class TPPlacement:
    """One parameter's TP layout.

    Attributes:
        dim: the tensor dim split across TP ranks; None: replicated.
        units: whole units `dim` holds in the global tensor (None: as many as ranks need).
        partial_grad: replicated only: each rank's gradient is a partial sum
            that nothing in the forward reduces; the DTensor gradient sums it over TP.
    """

    dim: int | None = None
    units: int | None = None
    partial_grad: bool = False

    def replicated_units(self, tp_size: int) -> bool:
        """True when each unit is held by several ranks (fewer units than TP ranks)."""
        return self.dim is not None and self.units is not None and self.units < tp_size


def shard(dim: int, units: int | None = None) -> TPPlacement:
    """Split on `dim` across the TP ranks (rank r holds the r-th block of `units / tp` units)."""
    return TPPlacement(dim=dim, units=units)


def replicate(partial_grad: bool = False) -> TPPlacement:
    """Held whole by every TP rank; `partial_grad`: its gradient is partial per rank and summed over TP.

    Leave `partial_grad` False when the forward already makes the gradient
    equal on every rank (e.g. the parameter enters through `copy_to_tp`, or
    is used after the TP reduction).
    """
    return TPPlacement(partial_grad=partial_grad)


def declare(module, name: str, placement: TPPlacement | None) -> None:
    """Records `placement` for `module.<name>` (a direct parameter; None parameters are skipped)."""
    if module._parameters.get(name) is None:
        return
    table = module.__dict__.setdefault(_ATTR, {})
    table[name] = placement


def declared(module) -> dict:
    """`{parameter name: TPPlacement}` of `module`'s own parameters."""
    return module.__dict__.get(_ATTR, {})


def on_local_params(write: bool = False, grad: bool = False):
    """Method decorator: with DTensor parameters, the method sees their local tensors (see `dtensor.local_params`).

    For code that reads or writes this rank's shards outside the forward
    (Keras weights, constraints, penalties, cache sizes). A no-op for modules
    built with process groups.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            if self.__dict__.get("_dist_mha_mesh") is None:
                return fn(self, *args, **kwargs)
            from dist_mha.parallel.dtensor import local_params

            with local_params(self, write=write, grad=grad):
                return fn(self, *args, **kwargs)

        return method

    return wrap

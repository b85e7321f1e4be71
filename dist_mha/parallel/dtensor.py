"""DTensor parameters on a DeviceMesh, while the forward computes on local tensors.

`distribute(module, tp_mesh, cp_mesh)` turns every parameter that declared
its TP placement (`dist_mha.parallel.tp.placement`) into a DTensor on the
parameter mesh: the TP axis, or the 2-D `(cp, tp)` slice of the root mesh
when context parallelism is a mesh axis too. Placements per mesh axis:

| declaration | TP axis | its gradient | CP axis | its gradient |
|---|---|---|---|---|
| `shard(d)` | `Shard(d)` | `Shard(d)` | `Replicate()` | `Partial("avg")` |
| `shard(d, units)`, units < tp | `Replicate()` (all units) | `Partial()` | same | same |
| `replicate()` | `Replicate()` | `Replicate()` | same | same |
| `replicate(partial_grad=True)` | `Replicate()` | `Partial()` | same | same |

CP ranks hold other tokens of the same batch, so their gradients are
averaged, as data parallelism averages over DP ranks (use a per-rank mean loss).

Forward on local tensors: each distributed module gets a forward pre-hook
that puts, for the call, the local view of every DTensor parameter under it
(`p.to_local(grad_placements=...)`, narrowed to this rank's unit for
replicated units) in place of the parameter, and a post-hook that puts the
parameter back. So the layers' code is the same with meshes and with process
groups. FSDP2's hooks run around ours (its pre-hook is prepended, its
post-hook appended): we see its unsharded parameter, and parameters FSDP
holds sharded (on a mesh with its DP axis) are left alone.

Outside the forward, `local_params(module)` gives the same views for code
that reads or writes local shards (Keras weights, per-rank checkpoints);
`write=True` re-gathers replicated units afterwards so every replica of a
unit stays equal.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from dist_mha.parallel import mesh as meshes
from dist_mha.parallel.tp import placement as tp_placement
from dist_mha.parallel.tp import sharding

_VIEWS = "_dist_mha_views"  # owner attribute: {name: _View}
_SWAPS = "_dist_mha_swaps"  # hooked module attribute: stack of swapped entries per active call
DTENSOR_GRAD = "_dist_mha_dtensor_grad"  # set on local views whose replicas' gradients the DTensor sums


@dataclass
class _View:
    """How to get a parameter's local view, and what the view's gradient means."""

    mesh: object
    grad_placements: tuple
    narrow: tuple | None  # (dim, start, length): this rank's unit of a replicated-units tensor
    tp_group: object
    replicas: int

    def of(self, p, grad: bool):
        if grad and torch.is_grad_enabled() and p.requires_grad:
            t = p.to_local(grad_placements=self.grad_placements)
        else:
            with torch.no_grad():
                t = p.to_local()  # the local tensor itself: writes land in the parameter
        if self.narrow is not None:
            t = t.narrow(*self.narrow)
            setattr(t, DTENSOR_GRAD, True)  # `sharding.sync_replicas` leaves the replicas' sum to the DTensor
        return t


def _axis_placements(layout_names, tp_name, tp_pl, tp_grad):
    pls, grads = [], []
    for name in layout_names:
        if name == tp_name:
            pls.append(tp_pl)
            grads.append(tp_grad)
        else:  # a CP axis: replicated parameters, gradients averaged over the ranks' tokens
            pls.append(Replicate())
            grads.append(Partial("avg"))
    return tuple(pls), tuple(grads)


def distribute(module: nn.Module, tp_mesh, cp_mesh=None) -> nn.Module:
    """Makes the declared parameters of `module` (and its children) DTensors; returns `module`.

    Parameters that already are DTensors are left as they are; a plain
    parameter without a declaration raises, since nothing says how its
    gradient relates to the other ranks'.

    Args:
        module: a module whose parameters declared their TP placement.
        tp_mesh: the 1-D TP mesh, or None (no TP axis).
        cp_mesh: the 1-D CP mesh, or None.

    Raises:
        ValueError: naming each undeclared plain parameter and how to declare it.
    """
    mesh = meshes.param_mesh(tp_mesh, cp_mesh)
    if mesh is None:
        return module
    names = mesh.mesh_dim_names
    tp_name = tp_mesh.mesh_dim_names[0] if tp_mesh is not None else None
    tp_group = tp_mesh.get_group() if tp_mesh is not None else None
    tp, rank = (tp_mesh.size(), tp_mesh.get_local_rank()) if tp_mesh is not None else (1, 0)
    undeclared = [f"{m_name + '.' if m_name else ''}{n}" for m_name, m in module.named_modules()
                  for n, p in m._parameters.items()
                  if p is not None and not isinstance(p, DTensor) and n not in tp_placement.declared(m)]
    if undeclared:
        raise ValueError(
            f"{type(module).__name__} was given a DeviceMesh, but parameters {undeclared} of it have no declared TP "
            "placement, so it is unknown how their gradients relate across ranks. Build those submodules with the "
            "same mesh, or declare each one next to where it is created: dist_mha.parallel.tp.placement.declare("
            "module, name, shard(dim) | replicate()).")
    for m in module.modules():
        for name, pl in tp_placement.declared(m).items():
            p = m._parameters.get(name)
            if p is None or isinstance(p, DTensor):
                continue
            narrow, replicas = None, 1
            local = p.detach()
            if pl.dim is None or tp == 1:
                tp_pl = Replicate()
                tp_grad = Partial() if (pl.partial_grad and tp > 1) else Replicate()
            elif pl.replicated_units(tp):
                # Fewer units than ranks: the DTensor holds every unit once (so DCP and clipping count each
                # once); this rank computes on its own unit, and the replicas' gradients add up over TP.
                replicas = tp // pl.units
                with torch.no_grad():
                    local = sharding.gather_full(local, pl.dim, tp_group, replicas).contiguous()
                unit = local.shape[pl.dim] // pl.units
                narrow = (pl.dim, (rank // replicas) * unit, unit)
                tp_pl, tp_grad = Replicate(), Partial()
            else:
                tp_pl = tp_grad = Shard(pl.dim)
            placements, grads = _axis_placements(names, tp_name, tp_pl, tp_grad)
            dt = DTensor.from_local(local, mesh, placements, run_check=False)
            m._parameters[name] = nn.Parameter(dt, requires_grad=p.requires_grad)
            m.__dict__.setdefault(_VIEWS, {})[name] = _View(mesh, grads, narrow, tp_group, replicas)
    if not module.__dict__.get("_dist_mha_hooked"):
        module.register_forward_pre_hook(_pre_forward)
        module.register_forward_hook(_post_forward, always_call=True)
        module.__dict__["_dist_mha_hooked"] = True
    module.__dict__["_dist_mha_mesh"] = mesh
    return module


def is_distributed(module: nn.Module) -> bool:
    """Whether `distribute` gave `module` (or a child) DTensor parameters."""
    return any(_VIEWS in m.__dict__ for m in module.modules())


def _current(m, name, view: _View):
    """The DTensor parameter `m.<name>` holds now, when it is on the parameter mesh (not FSDP-sharded)."""
    p = m._parameters.get(name)
    if not isinstance(p, DTensor):
        return None
    mesh = p.device_mesh
    if mesh is view.mesh or mesh.mesh_dim_names == view.mesh.mesh_dim_names:
        return p
    return None


def _swap(module: nn.Module, grad: bool, strict: bool = False) -> list:
    swapped = []
    for m in module.modules():
        views = m.__dict__.get(_VIEWS)
        if not views:
            continue
        for name, view in views.items():
            p = _current(m, name, view)
            if p is None:
                if strict and isinstance(m._parameters.get(name), DTensor):
                    _restore(swapped)
                    raise ValueError(
                        f"Parameter '{name}' of {type(m).__name__} is sharded by FSDP (mesh "
                        f"{m._parameters[name].device_mesh}); its local TP shard is not held here. Read or write "
                        "Keras weights and per-rank checkpoints before fully_shard, or use "
                        "torch.distributed.checkpoint.state_dict (get/set_model_state_dict) on the sharded model.")
                continue
            v = view.of(p, grad)
            m._parameters[name] = v
            swapped.append((m, name, p, v))
    return swapped


def _restore(swapped: list) -> None:
    for m, name, p, v in reversed(swapped):
        if m._parameters.get(name) is v:  # FSDP may have put its own parameter there meanwhile
            m._parameters[name] = p


def _pre_forward(module, args):
    module.__dict__.setdefault(_SWAPS, []).append(_swap(module, grad=True))


def _post_forward(module, args, output):
    stack = module.__dict__.get(_SWAPS)
    if stack:
        _restore(stack.pop())


def _resync(swapped: list) -> None:
    """Every replica of a unit gets the value its first holder has (after a write to local views)."""
    for m, name, p, v in swapped:
        view = m.__dict__[_VIEWS][name]
        if view.narrow is None:
            continue
        dim = view.narrow[0]
        with torch.no_grad():
            full = sharding.gather_full(v.contiguous(), dim, view.tp_group, view.replicas)
            p.to_local().copy_(full)


@contextlib.contextmanager
def local_params(module: nn.Module, write: bool = False, grad: bool = False):
    """Inside the block `module`'s DTensor parameters are their local tensors (views: writes land).

    Args:
        write: the block writes the local tensors: replicated units are
            re-gathered over TP at the end (collective: every TP rank enters).
        grad: views carry autograd back to the DTensor parameters (differentiable penalties).
    """
    swapped = _swap(module, grad=grad, strict=True)
    try:
        yield
    finally:
        _restore(swapped)
    if write:
        _resync(swapped)


def local_tensor(module: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """The local form of `t` (the parameter `module.<name>` or a tensor laid out like it, e.g. an Adam moment)."""
    if not isinstance(t, DTensor):
        return t
    view = module.__dict__.get(_VIEWS, {}).get(name)
    with torch.no_grad():
        t = t.to_local()
    return t if view is None or view.narrow is None else t.narrow(*view.narrow)


def from_local(module: nn.Module, name: str, like: DTensor, local: torch.Tensor) -> DTensor:
    """A DTensor laid out like `like` (parameter `module.<name>`) from this rank's local form `local`.

    Replicated units are all-gathered over TP (collective).
    """
    view = module.__dict__[_VIEWS][name]
    if view.narrow is not None:
        local = sharding.gather_full(local.contiguous(), view.narrow[0], view.tp_group, view.replicas)
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False)


def reduce_grads(params) -> None:
    """Puts every DTensor gradient into its parameter's placements (the partial sums reduced once).

    Without FSDP a gradient stays `Partial` and is reduced again by every op
    that reads it; call this once after backward instead.
    """
    for p in params:
        if isinstance(p, DTensor) and isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)


def local_grads(module: nn.Module) -> dict:
    """`{id(parameter): this rank's local gradient}` of `module`'s DTensor parameters (partial sums reduced)."""
    out = {}
    for m in module.modules():
        for name in m.__dict__.get(_VIEWS, {}):
            p = m._parameters.get(name)
            if isinstance(p, DTensor) and p.grad is not None:
                g = p.grad if p.grad.placements == p.placements else p.grad.redistribute(p.device_mesh, p.placements)
                out[id(p)] = local_tensor(m, name, g)
    return out


def local_state_dict(module: nn.Module) -> dict:
    """`module.state_dict()` with every DTensor as this rank's local shard: the per-rank checkpoint format.

    The same keys, shapes and `_extra_state` as a model built with process
    groups, so `dist_mha.checkpoint.save_tp_shard` writes it and
    `load_tp_shard` reshards it as before.
    """
    with local_params(module):
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in module.state_dict().items()}


def load_local_state_dict(module: nn.Module, state_dict: dict, strict: bool = True):
    """Loads a per-rank state dict (local shards, e.g. from `load_tp_shard`) into DTensor parameters.

    Collective over TP when units are replicated (they are re-gathered).
    """
    with local_params(module, write=True):
        return module.load_state_dict(state_dict, strict=strict)

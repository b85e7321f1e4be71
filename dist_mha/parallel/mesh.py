"""DeviceMesh arguments: the root mesh of a `ParallelState`, and axes given as meshes instead of groups.

Every `tp_group=` / `cp_group=` argument takes None, a process group, or a
1-D `DeviceMesh` slice of one root mesh (`state.mesh["tp"]`). A process group
keeps the layers' plain per-rank parameters; a mesh makes them DTensors (see
`dist_mha.parallel.dtensor`), so FSDP2, DCP and `clip_grad_norm_` see their
global shapes. `axis_arg` turns either form into the process group the
collectives run on, plus the mesh (or None), and checks the mesh before any
collective.

The root mesh is built from the groups `build_parallel_state` already made
(`DeviceMesh.from_group`), so it adds no process group and every axis keeps
the timeout of those groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MESH_DIMS = ("dp", "cp", "tp")


def _device_mesh_type():
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh


def mesh_device_type() -> str:
    """"cuda" when the default group runs NCCL, else "cpu" (gloo; CPU tensors)."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def root_mesh(groups: dict, sizes: tuple[int, int, int], device_type: str | None = None):
    """The `("dp", "cp", "tp")` mesh over every rank, from this rank's existing groups.

    Args:
        groups: `{"dp": group, "cp": group, "tp": group}` of this rank (size-1 axes included).
        sizes: `(dp, cp, tp)`; rank `(d * cp + c) * tp + t` sits at `[d, c, t]`.
        device_type: "cpu" or "cuda"; None: `mesh_device_type()`.
    """
    DeviceMesh = _device_mesh_type()
    ranks = torch.arange(sizes[0] * sizes[1] * sizes[2]).reshape(sizes)
    return DeviceMesh.from_group([groups[d] for d in MESH_DIMS], device_type or mesh_device_type(), mesh=ranks,
                                 mesh_dim_names=MESH_DIMS)


def is_mesh(value) -> bool:
    if value is None or not dist.is_available():
        return False
    return isinstance(value, _device_mesh_type())


def axis_arg(name: str, value):
    """`(process group or None, 1-D mesh or None)` for a `tp_group=` / `cp_group=` argument.

    Raises:
        ValueError: naming the argument, for a mesh that is not 1-D, has no
            dim name, or does not hold this rank.
    """
    if not is_mesh(value):
        return value, None
    if value.ndim != 1:
        names = value.mesh_dim_names or ()
        hint = f" such as mesh[{names[-1]!r}]" if names else ""
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected a 1-D DeviceMesh (one parallel axis){hint} "
            f"or a process group. Received: {name}={value!r} with {value.ndim} dims {tuple(names)}. Pass one axis "
            f"of the root mesh, e.g. {name}=state.mesh[{'tp' if name.startswith('tp') else 'cp'!r}].")
    if not value.mesh_dim_names:
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected a named axis of a root mesh (e.g. "
            f"state.mesh['tp'] from dist_mha.parallel.build_parallel_state). Received: {name}={value!r} without "
            "mesh_dim_names: give the mesh dim names (init_device_mesh(..., mesh_dim_names=(...))).")
    if value.get_coordinate() is None:
        raise ValueError(f"This rank ({dist.get_rank()}) is not in `{name}`={value!r}; pass the mesh axis of this rank.")
    return value.get_group(), value


def param_mesh(tp_mesh, cp_mesh, tp_name: str = "tp_group", cp_name: str = "cp_group"):
    """The mesh parameters live on: `tp_mesh`, or the 2-D `(cp, tp)` slice of their root when CP is a mesh too.

    Parameters are replicated over CP ranks (each holds other tokens), so a
    CP axis makes them `Replicate` there, with gradients averaged over it.

    Raises:
        ValueError: when one axis is a mesh and the other a process group, or
            the two meshes do not come from one root mesh.
    """
    if cp_mesh is not None and cp_mesh.size() == 1:
        cp_mesh = None
    if tp_mesh is None or cp_mesh is None:
        return tp_mesh if tp_mesh is not None else cp_mesh
    root_t, root_c = tp_mesh._get_root_mesh(), cp_mesh._get_root_mesh()
    if root_t is not root_c and root_t != root_c:
        raise ValueError(
            f"Received `{tp_name}`={tp_mesh!r} and `{cp_name}`={cp_mesh!r} from two different root meshes; expected "
            "two axes of one mesh, e.g. state.mesh['tp'] and state.mesh['cp'].")
    return root_t[(cp_mesh.mesh_dim_names[0], tp_mesh.mesh_dim_names[0])]


def axes(tp_group, cp_group):
    """`(tp_group, tp_mesh, cp_group, cp_mesh)` for a module's `tp_group=` / `cp_group=` arguments.

    Checks that both take one form (`check_axes`), then splits each with `axis_arg`:
    a process group (or None) with mesh None, or a 1-D mesh's group with the mesh.
    """
    check_axes(tp_group, cp_group)
    return (*axis_arg("tp_group", tp_group), *axis_arg("cp_group", cp_group))


def check_axes(tp_group, cp_group, tp_name: str = "tp_group", cp_name: str = "cp_group") -> None:
    """Raises when one of TP/CP is a mesh and the other a process group (parameters need one form).

    A size-1 or absent axis is fine either way.
    """
    from dist_mha.parallel.groups import size_of

    tp_is, cp_is = is_mesh(tp_group), is_mesh(cp_group)
    if tp_is == cp_is:
        return
    group_name, group = (cp_name, cp_group) if tp_is else (tp_name, tp_group)
    if group is None or size_of(group) == 1:
        return
    raise ValueError(
        f"Received `{tp_name}`={tp_group!r} and `{cp_name}`={cp_group!r}: one a DeviceMesh, the other a process "
        f"group. Pass both as axes of one mesh (state.mesh['tp'], state.mesh['cp']) or both as process groups "
        f"(state.tp_group, state.cp_group); `{group_name}` decides nothing on its own.")

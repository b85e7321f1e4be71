"""Process groups as optional arguments: size, rank, timeout, and the group host-side values travel on.

Every parallel axis (TP, CP, DP) is a process-group argument that may be
None (no parallelism on that axis). This module is the one place that
answers the questions every caller has about such an argument.

Which device a collective's tensors must be on is decided here too, once:
activations and gradients are on the model's device, which the group's
backend takes (NCCL: CUDA; gloo: CPU or CUDA). Small host-side values
(seeds, token counts, agreement checks) are CPU tensors, and they travel on
`cpu_group(group)`: the group itself when it is gloo, else a gloo companion
over the same ranks. NCCL refuses CPU tensors, and moving such a value to
the GPU would cost a device synchronisation to read it back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def size_of(group) -> int:
    """Ranks in `group`; 1 for None (no parallelism on that axis)."""
    return 1 if group is None else dist.get_world_size(group)


def rank_of(group) -> int:
    """This process's index in `group`; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def timeout_of(group):
    """The collective timeout `group` was created with (None if torch does not say)."""
    try:
        for device in group._device_types:
            return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        pass
    return None


_CPU_GROUPS: dict = {}  # ranks -> a gloo group over them (one per group, made once)


def cpu_group(group):
    """The group host-side CPU tensors travel on: `group` when it is gloo, else a gloo group over its ranks.

    Rank agreement, seeds and token counts run there on CPU tensors, so they
    never wait for the GPU (on an NCCL group a CUDA tensor read back would
    sync every call) and never hand NCCL a CPU tensor. Created with local synchronisation, so only the group's
    ranks take part, and with the group's own timeout (else torch's 30-minute
    default would let a hung peer block that long).
    """
    if group is None or dist.get_backend(group) == "gloo":
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _CPU_GROUPS:
        timeout = timeout_of(group)
        kwargs = {} if timeout is None else {"timeout": timeout}
        _CPU_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True, **kwargs)
    return _CPU_GROUPS[ranks]


def host_all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM, async_op: bool = False):
    """All-reduces a CPU tensor of host-side values over `group` (on its gloo companion); None group: no-op."""
    if size_of(group) == 1:
        return None
    return dist.all_reduce(t, op=op, group=cpu_group(group), async_op=async_op)

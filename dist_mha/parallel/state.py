"""Tensor-, context- and data-parallel process groups, and DeepSpeed's `mpu` interface.

Ranks are laid out DP x CP x TP with TP fastest: `rank = (dp * cp_size + cp)
* tp_size + tp`. With world 8, tp 2, cp 2: TP groups {0,1} {2,3} {4,5} {6,7},
CP groups {0,2} {1,3} {4,6} {5,7}, DP groups {0,4} {1,5} {2,6} {3,7}, and the
DP x CP groups that reduce gradients {0,2,4,6} {1,3,5,7}. TP traffic (every
layer, blocking) stays among neighbouring ranks, i.e. inside a node; CP ring
traffic (overlapped) and DP traffic (once per step) go further. Nothing here
is a module global: `ParallelState` is built once and passed around.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from dist_mha.parallel.mesh import root_mesh


@dataclass
class ParallelState:
    """The groups this rank belongs to.

    Attributes:
        tp_group, dp_group: process groups (None when that axis has size 1
            and no process group is initialised).
        tp_size, tp_rank, dp_size, dp_rank: sizes and this rank's index on each axis.
        cp_group, cp_size, cp_rank: context parallelism (None / 1 / 0 without it).
        dp_cp_group: every rank with this TP rank (DP x CP): gradients are summed over it.
        mesh: a `DeviceMesh` over all ranks with dims `("dp", "cp", "tp")`, in
            this layout, over these same groups (None without torch.distributed).
            Pass its axes (`mesh["tp"]`, `mesh["cp"]`) as `tp_group=`/`cp_group=`
            for DTensor parameters, and `mesh["dp"]` to FSDP2's `fully_shard`.
    """

    tp_group: object
    dp_group: object
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    cp_group: object = None
    cp_size: int = 1
    cp_rank: int = 0
    dp_cp_group: object = None
    mesh: object = None


def _default_group_timeout() -> timedelta | None:
    """The timeout the default process group was initialised with (None if torch does not say)."""
    try:
        from torch.distributed import distributed_c10d as c10d

        pg = c10d._get_default_group()
        for device in pg._device_types:
            return pg._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        pass
    return None


def build_parallel_state(tp_size: int, cp_size: int = 1, *, timeout: timedelta | None = None) -> ParallelState:
    """Splits the default process group into DP x CP x TP groups (TP ranks contiguous, then CP).

    Every rank must call this with the same sizes (it creates groups, which
    is collective).

    Args:
        tp_size: ranks per tensor-parallel group.
        cp_size: ranks per context-parallel group (the sequence is split across them).
        timeout: collective timeout for the new groups; None gives them the
            default group's timeout (torch's `new_group` would otherwise use its
            own 30-minute default, so a hung peer would block that long).

    Returns:
        This rank's `ParallelState`; its `mesh` is the `("dp", "cp", "tp")`
        DeviceMesh over the groups made here (no further groups are created).

    Raises:
        ValueError: if `tp_size * cp_size` does not divide the world size.
    """
    for name, v in (("tp_size", tp_size), ("cp_size", cp_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"Received an invalid value for argument `{name}`, expected a positive int. "
                             f"Received: {name}={v!r}")
    if not dist.is_initialized():
        if tp_size * cp_size != 1:
            raise ValueError(
                f"Received parallel tp_size={tp_size}, cp_size={cp_size} but torch.distributed is not initialised; "
                "launch with torchrun (or call init_process_group) or use 1."
            )
        return ParallelState(None, None, 1, 0, 1, 0)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp_size * cp_size):
        valid = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(
            f"Received an invalid value for argument `tp_size`, expected tp_size * cp_size to divide the world size "
            f"{world}: each a product of the divisors {valid}. Received: tp_size={tp_size!r}, cp_size={cp_size!r}"
        )
    if timeout is None:
        timeout = _default_group_timeout()
    kwargs = {} if timeout is None else {"timeout": timeout}
    block = tp_size * cp_size
    groups = {}

    def make(name, ranks):
        g = dist.new_group(ranks, **kwargs)
        if rank in ranks:
            groups[name] = g

    for start in range(0, world, tp_size):
        make("tp", list(range(start, start + tp_size)))
    for start in range(0, world, block):
        for t in range(tp_size):
            make("cp", list(range(start + t, start + block, tp_size)))
    for offset in range(block):
        make("dp", list(range(offset, world, block)))
    for t in range(tp_size):
        make("dp_cp", list(range(t, world, tp_size)))
    device_mesh = root_mesh(groups, (world // block, cp_size, tp_size))
    return ParallelState(groups["tp"], groups["dp"], tp_size, rank % tp_size, world // block, rank // block,
                         groups["cp"] if cp_size > 1 else None, cp_size, (rank // tp_size) % cp_size, groups["dp_cp"],
                         device_mesh)


class MPU:
    """DeepSpeed's model-parallel-unit interface over a `ParallelState`.

    DeepSpeed calls `get_model_parallel_rank/world_size/group` and
    `get_data_parallel_rank/world_size/group`, and probes the
    `get_tensor_model_parallel_*` aliases; pipeline parallelism is size 1.

    Example:

    >>> state = build_parallel_state(tp_size=2)
    >>> engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=MPU(state))
    """

    def __init__(self, state: ParallelState):
        self.state = state

    def get_model_parallel_rank(self):
        return self.state.tp_rank

    def get_model_parallel_world_size(self):
        return self.state.tp_size

    def get_model_parallel_group(self):
        return self.state.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.state.dp_rank

    def get_data_parallel_world_size(self):
        return self.state.dp_size

    def get_data_parallel_group(self):
        return self.state.dp_group

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipeline_model_parallel_world_size(self):
        return 1

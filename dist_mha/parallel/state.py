"""Tensor- and data-parallel process groups, and DeepSpeed's `mpu` interface.

Ranks are laid out TP-contiguous: with world 8 and tp 2, TP groups are
{0,1} {2,3} {4,5} {6,7} and DP groups {0,2,4,6} {1,3,5,7}, so TP traffic
stays inside a node. Nothing here is a module global: `ParallelState` is
built once and passed around.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass
class ParallelState:
    """The groups this rank belongs to.

    Attributes:
        tp_group, dp_group: process groups (None when that axis has size 1
            and no process group is initialised).
        tp_size, tp_rank, dp_size, dp_rank: sizes and this rank's index on each axis.
    """

    tp_group: object
    dp_group: object
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int


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


def build_parallel_state(tp_size: int, *, timeout: timedelta | None = None) -> ParallelState:
    """Splits the default process group into TP x DP groups (TP ranks contiguous).

    Every rank must call this with the same `tp_size` (it creates groups,
    which is collective).

    Args:
        tp_size: ranks per tensor-parallel group.
        timeout: collective timeout for the new groups; None gives them the
            default group's timeout (torch's `new_group` would otherwise use its
            own 30-minute default, so a hung peer would block that long).

    Returns:
        This rank's `ParallelState`.

    Raises:
        ValueError: if `tp_size` does not divide the world size.
    """
    if not dist.is_initialized():
        if tp_size != 1:
            raise ValueError(
                f"Received parallel tp_size={tp_size} but torch.distributed is not initialised; "
                "launch with torchrun (or call init_process_group) or use tp_size=1."
            )
        return ParallelState(None, None, 1, 0, 1, 0)
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size <= 0 or world % tp_size:
        valid = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(
            f"Received an invalid value for argument `tp_size`, expected a divisor of the world size "
            f"{world}: one of {valid}. Received: tp_size={tp_size!r}"
        )
    if timeout is None:
        timeout = _default_group_timeout()
    kwargs = {} if timeout is None else {"timeout": timeout}
    tp_group = dp_group = None
    for start in range(0, world, tp_size):
        ranks = list(range(start, start + tp_size))
        g = dist.new_group(ranks, **kwargs)
        if rank in ranks:
            tp_group = g
    for offset in range(tp_size):
        ranks = list(range(offset, world, tp_size))
        g = dist.new_group(ranks, **kwargs)
        if rank in ranks:
            dp_group = g
    return ParallelState(tp_group, dp_group, tp_size, rank % tp_size, world // tp_size, rank // tp_size)


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

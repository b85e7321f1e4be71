"""Process-group start-up for torchrun, the deepspeed launcher, srun, or a single process.

Ranks come from the environment (`RANK`/`WORLD_SIZE`/`LOCAL_RANK`, or
SLURM's `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID` under plain srun).
The store is wrapped in a prefix keyed by `TORCHELASTIC_RESTART_COUNT`: after
a torchrun restart the rendezvous store still holds the first attempt's gloo
keys, and a fresh prefix keeps the new attempt from reading them (the
alternative, `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`, is exported by our
launch scripts too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    restart: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_id() -> str | None:
    """The launcher's id of this job, the same on every rank: torchrun's run id, else SLURM's job id.

    torchrun without `--rdzv-id` (and without `--standalone`) sets
    `TORCHELASTIC_RUN_ID=none` for every job: that is no id, or unrelated runs
    would share a run directory and a lock owner.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id.lower() != "none":
        return run_id
    return os.environ.get("SLURM_JOB_ID") or None


def _env_int(*names, default=None):
    for n in names:
        if os.environ.get(n) not in (None, ""):
            return int(os.environ[n])
    return default


def _slurm_master() -> None:
    """Under srun (or hydra-submitit) without a launcher: rank 0's store on the job's first node.

    The port is derived from the job id, so every task computes the same one.
    """
    import subprocess

    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    info = subprocess.run(["scontrol", "show", "node", nodes[0]], capture_output=True, text=True, check=True).stdout
    addr = next((w.split("=", 1)[1] for w in info.split() if w.startswith("NodeAddr=")), nodes[0])
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 120.0) -> DistInfo:
    """Initialises the default process group from the environment (no-op for one process).

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda".
        backend: "auto" (nccl on CUDA, gloo on CPU), "gloo" or "nccl".
        timeout_s: collective timeout.

    Returns:
        This process's `DistInfo`.
    """
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    # Under plain srun, publish the torch names too (DeepSpeed reads LOCAL_RANK).
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)):
        os.environ.setdefault(name, str(value))
    restart = _env_int("TORCHELASTIC_RESTART_COUNT", default=0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if "MASTER_PORT" not in os.environ and "SLURM_JOB_ID" in os.environ:
            _slurm_master()
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = _env_int("MASTER_PORT")
        if port is None:
            raise ValueError("MASTER_PORT is not set: launch with torchrun, the deepspeed launcher, or a slurm/ script.")
        # Under torchrun the agent already serves the store; elsewhere rank 0 does.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(addr, port, world, is_master=(rank == 0 and not agent_store),
                              timeout=timedelta(seconds=timeout_s))
        store = dist.PrefixStore(f"dist_mha/attempt{restart}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s),
                                **({"device_id": dev} if backend == "nccl" else {}))
    return DistInfo(rank, world, local_rank, dev, restart)


def _backend_of(pg):
    for device in ("cpu", "cuda"):
        try:
            return pg._get_backend(torch.device(device))
        except (RuntimeError, ValueError):
            continue
    return None


def group_timeouts() -> dict:
    """`{ranks of the group: timeout in seconds}` for every process group this process belongs to."""
    from torch.distributed import distributed_c10d as c10d

    out = {}
    for pg in list(c10d._world.pg_map):
        backend = _backend_of(pg)
        options = getattr(backend, "options", None)
        if options is not None and hasattr(options, "_timeout"):
            out[tuple(dist.get_process_group_ranks(pg))] = options._timeout.total_seconds()
    return out


def set_group_timeouts(timeout: timedelta) -> int:
    """Gives every process group this process belongs to `timeout` (groups DeepSpeed made too); returns how many.

    torch's `new_group` defaults to 30 minutes, not the default group's
    timeout, so a group created without one would let a hung peer block for
    half an hour.
    """
    from torch.distributed import distributed_c10d as c10d

    n = 0
    for pg in list(c10d._world.pg_map):
        try:
            c10d._set_pg_timeout(timeout, pg)
            n += 1
        except (ValueError, RuntimeError, AssertionError):
            continue
    return n


def shutdown(engine=None) -> None:
    """Leaves no process group or DeepSpeed communicator to be torn down at interpreter exit."""
    if not dist.is_initialized():
        return
    dist.barrier()
    if engine is not None:
        import deepspeed.comm

        engine.destroy()
        deepspeed.comm.destroy_process_group()  # torch's groups and DeepSpeed's references to them
    if dist.is_initialized():
        dist.destroy_process_group()

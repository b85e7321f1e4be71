"""A run's start on every rank: one run dir, one writer, a checked resume point.

Rank 0 decides each of these and every rank learns the decision (or the
error) from one broadcast, so ranks never split a run over two directories
and never wait in a collective for a rank that has already given up.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from dist_mha.train.run_dir import ROOTS, clean, config_diff, find_resume, has_work, steps


def from_rank0(fn):
    """Runs `fn()` on rank 0 and returns its result on every rank, or raises its error on every rank."""
    if not dist.is_initialized():
        return fn()
    payload = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except Exception as e:
            error = e
            e.agreed = True  # every rank raises it: no rank is left inside a collective
            try:
                pickle.dumps(e)
                payload = [("error", e)]
            except Exception:
                payload = [("error", RuntimeError(f"{type(e).__name__}: {e}"))]
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise error if error is not None else value
    return value


def agree_run_dir(run_dir) -> Path:
    """Rank 0's run directory, on every rank.

    Launchers that give the ranks no shared run id (the `deepspeed` CLI, plain
    srun) let each rank's Hydra resolve its own timestamp; the others follow
    rank 0 and remove the empty directory Hydra made for them.
    """
    mine = Path(run_dir).resolve()
    chosen = Path(from_rank0(lambda: str(mine)))
    if chosen != mine:
        try:
            mine.rmdir()  # only when empty: nothing else is ever removed here
        except OSError:
            pass
    return chosen


@dataclass
class Plan:
    """Where a run starts: `resume_dir` (a verified step directory) or None for step 0."""

    resume_dir: str | None = None
    step: int = 0
    notes: list = field(default_factory=list)


def plan_start(run_dir: Path, *, resume: bool, kind: str, run_config: dict, tp: int, world: int) -> Plan:
    """Rank 0, holding the run lock: cleans crash leftovers and picks the resume point.

    Raises:
        ValueError: `train.resume=false` in a run dir that holds a run; checkpoints
            of the other kind (DeepSpeed vs plain); a changed model config.
        CheckpointError: checkpoints exist but none is intact.
    """
    work = has_work(run_dir)
    if not resume and work:
        raise ValueError(
            f"train.resume=false, but run dir {run_dir} already holds a run: {'; '.join(work)}. Starting over "
            "there would mix two runs' checkpoints and metrics. Resume it (train.resume=true, the default), "
            f"start in another directory (hydra.run.dir=...), or delete {run_dir} first.")
    notes = []
    for name in ROOTS.values():
        notes += clean(run_dir / name)
    if not resume:
        return Plan(None, 0, notes)
    writers = {"deepspeed": "launcher=deepspeed", "tp": "train.checkpoint_format=shards (without deepspeed)",
               "dcp": "train.checkpoint_format=dcp (without deepspeed)"}
    for other in (k for k in ROOTS if k != kind and steps(run_dir / ROOTS[k])):
        raise ValueError(
            f"Run dir {run_dir} holds checkpoints in {ROOTS[other]}/, written with {writers[other]}; this run "
            f"cannot resume them. Resume with {writers[other]}, or start in another directory (hydra.run.dir=...).")
    step_dir, manifest, more = find_resume(run_dir / ROOTS[kind])
    notes += more
    if step_dir is None:
        if work:
            notes.append("no checkpoint to resume from: starting at step 0 (earlier metrics rows are dropped)")
        return Plan(None, 0, notes)
    diff = config_diff(manifest.get("config", {}), run_config)
    if diff:
        raise ValueError(
            f"Run dir {run_dir} holds a run with another model config, so its checkpoint {step_dir.name} cannot be "
            f"loaded into this model: {'; '.join(diff)}. Resume with the run's settings (recorded in "
            f"{step_dir / 'manifest.json'}), or start the new model in another directory (hydra.run.dir=...).")
    if kind == "deepspeed" and (manifest.get("tp"), manifest.get("world")) != (tp, world):
        raise ValueError(
            f"Run dir {run_dir} holds DeepSpeed checkpoints written at tp={manifest.get('tp')} with "
            f"{manifest.get('world')} processes; DeepSpeed resumes only at the same layout (now tp={tp}, "
            f"{world} processes). Relaunch with that layout, or use the plain launcher, which reshards.")
    return Plan(str(step_dir), int(manifest["step"]), notes)


def describe_launch(world: int) -> str:
    """Who started this process, for the log: single process, torchrun, the deepspeed CLI, srun."""
    if world == 1:
        return "single process"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun, {world} processes"
    if os.environ.get("CROSS_RANK") is not None and os.environ.get("LOCAL_SIZE") is not None:
        return f"deepspeed CLI, {world} processes"
    if os.environ.get("SLURM_PROCID") is not None:
        return f"srun, {world} processes"
    return f"{world} processes (ranks from RANK/WORLD_SIZE)"

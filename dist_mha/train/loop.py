"""The training loop: start (run dir, lock, resume point), build, train, log, checkpoint, plot, shut down.

Only rank 0 prints progress and writes logs and metrics; every rank raises
on error (torchrun then tears the job down and, with --max-restarts, restarts
it from the last checkpoint). Once a run holds its run dir, an error is
written with its traceback to `train.log` before it propagates.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from dist_mha.checkpoint.atomic_io import atomic_write
from dist_mha.parallel import build_parallel_state
from dist_mha.train import fsdp
from dist_mha.train.data import make_data
from dist_mha.train.distributed import group_timeouts, init_distributed, set_group_timeouts, shutdown
from dist_mha.train.faults import inject
from dist_mha.train.plot import plot_loss
from dist_mha.train.run_lock import RunLock
from dist_mha.train.setup import Run, build_model, check_layout, resume, start_deepspeed
from dist_mha.train.startup import agree_run_dir, describe_launch, from_rank0, plan_start
from dist_mha.train.step import Meter, global_mean_loss, save, train_step

log = logging.getLogger("dist_mha.train")


def _setup_logging(run_dir: Path, is_main: bool) -> None:
    root = logging.getLogger("dist_mha")
    for h in root.handlers:
        h.close()
    root.handlers.clear()
    root.propagate = False
    if is_main:
        root.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")):
            h.setFormatter(fmt)
            root.addHandler(h)
    else:
        root.setLevel(logging.ERROR)
        root.addHandler(logging.StreamHandler(sys.stderr))


def _truncate_metrics(path: Path, last_step: int) -> int:
    """Drops metrics of steps after the one we start from, so each step is logged once; returns rows dropped."""
    if not path.is_file():
        return 0
    rows = [ln for ln in path.read_text().splitlines() if ln]
    keep = [ln for ln in rows if json.loads(ln)["step"] <= last_step]
    if len(keep) != len(rows):
        atomic_write(path, lambda f: f.write("".join(ln + "\n" for ln in keep).encode()))
    return len(rows) - len(keep)


def train(cfg, run_dir, on_start=None) -> dict:
    """Runs one training job described by the Hydra config `cfg` in `run_dir`; returns a summary.

    Args:
        cfg: the composed config (`configs/config.yaml`).
        run_dir: this rank's run directory; rank 0's is used by every rank.
        on_start: called on rank 0 with the run dir once the run holds it
            (the Hydra app writes `.hydra/` there).
    """
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    info = init_distributed(cfg.train.device, cfg.parallel.backend, cfg.parallel.timeout_s)
    requested, lock, started = Path(run_dir), None, False
    try:
        run_dir = agree_run_dir(requested)
        tp, cp = int(cfg.parallel.tp), int(cfg.parallel.get("cp", 1))
        if info.world_size % (tp * cp):
            raise ValueError(f"Received parallel.tp={tp} and parallel.cp={cp} with {info.world_size} processes; "
                             "tp * cp must divide the world size.")
        dp = info.world_size // (tp * cp)
        if cfg.parallel.dp not in (None, "auto") and int(cfg.parallel.dp) != dp:
            raise ValueError(f"Received parallel.dp={cfg.parallel.dp} but world {info.world_size} / (tp {tp} x cp {cp}) "
                             f"gives dp={dp}.")
        if cp > 1 and cfg.launcher.name == "deepspeed":
            raise ValueError("parallel.cp > 1 runs with launcher=torchrun: DeepSpeed averages gradients over its data-"
                             "parallel group, which would have to span DP x CP. Drop launcher=deepspeed or set parallel.cp=1.")
        data = make_data(cfg.data, cfg.train.seed)
        kind = fsdp.checkpoint_kind(cfg)
        run_config = {"model": OmegaConf.to_container(cfg.model, resolve=True),
                      "data": {"name": cfg.data.name, "vocab_size": data.vocab_size, "seq_len": data.seq_len}}

        def take():
            nonlocal lock
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir).acquire()
            try:
                plan = plan_start(run_dir, resume=bool(cfg.train.resume), kind=kind, run_config=run_config,
                                  tp=tp, world=info.world_size)
                if lock.took_over:
                    plan.notes.insert(0, f"took over the stale lock of {lock.took_over}")
                if on_start is not None:
                    on_start(run_dir)
            except BaseException:
                lock.release()
                lock = None
                raise
            return plan

        plan = from_rank0(take)
        started = True
        _setup_logging(run_dir, info.is_main)
        try:
            return _run(cfg, info, run_dir, plan, data, kind, run_config, tp, dp, cp)
        except BaseException as e:
            if info.is_main:
                log.exception("the run failed at this error (the traceback follows)")
            if "timed out" in str(e).lower():
                log.error("a peer did not answer within parallel.timeout_s=%s s (a hung, stopped or dead rank), so this "
                          "rank stops. Rerun the same command to resume from the last checkpoint.", cfg.parallel.timeout_s)
            raise
    except BaseException as e:
        if info.is_main and not started:
            try:
                requested.rmdir()  # a directory made for this run and still empty
            except OSError:
                pass
        if getattr(e, "agreed", False) and dist.is_initialized():
            dist.destroy_process_group()  # every rank raised here, so none waits in a collective
        raise
    finally:
        if lock is not None:
            lock.release()


def _run(cfg, info, run_dir: Path, plan, data, kind: str, run_config: dict, tp: int, dp: int, cp: int) -> dict:
    for note in plan.notes:
        log.warning(note)
    torch.manual_seed(cfg.train.seed)
    timeout = timedelta(seconds=float(cfg.parallel.timeout_s))
    state = build_parallel_state(tp, cp, timeout=timeout)
    check_layout(cfg, data, tp, cp)
    run = Run(cfg, info, state, run_dir, data, kind, tp, cp, dp, timeout)
    build_model(run, run_config)
    resume(run, plan)
    start_deepspeed(run, plan)
    if dist.is_initialized():
        set_group_timeouts(timeout)  # groups made by others (DeepSpeed) too
    if info.is_main:
        _log_start(run, plan.step)
    _loop(run, plan.step)
    return _finish(run)


def _log_start(run: Run, step: int) -> None:
    dropped = _truncate_metrics(run.run_dir / "metrics.jsonl", step)
    if dropped:
        log.warning("dropped %d metrics rows after step %d: those steps run again", dropped, step)
    engine_name = (f"DeepSpeed ZeRO-{int(run.cfg.launcher.zero_stage)}" if run.engine is not None else
                   "PyTorch FSDP2, DCP checkpoints" if run.mode == "fsdp2" else
                   "PyTorch, DCP checkpoints" if run.kind == "dcp" else "PyTorch")
    log.info("run dir %s | world %d = tp %d x cp %d x dp %d | %s | %d local parameters | launched by %s | %s | "
             "%d threads", run.run_dir, run.info.world_size, run.tp, run.cp, run.dp, run.info.device,
             fsdp.local_numel(run.params), describe_launch(run.info.world_size), engine_name, torch.get_num_threads())
    if dist.is_initialized():
        log.info("process group timeouts (s): %s", sorted(set(group_timeouts().values())))


def _loop(run: Run, first_step: int) -> None:
    cfg, step, losses = run.cfg, first_step, []
    meter = Meter(run)
    run.model.train()
    while step < cfg.train.steps:
        inject(cfg, run.info, step, "step")
        loss, batch = train_step(run, step)
        step += 1
        if step == first_step + 1 and dist.is_initialized():
            set_group_timeouts(run.timeout)  # groups created lazily in the first step (e.g. gloo twins of NCCL groups)
        losses.append(loss.detach())
        meter.seen += batch.tokens_seen
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            meter.log(step, global_mean_loss(run, losses))
            losses = []
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
            save(run, step)
            if cfg.train.stop_at_step is not None and step >= cfg.train.stop_at_step:
                break  # a clean interruption right after a checkpoint (resume tests, time limits)
    run.steps_done = step


def _finish(run: Run) -> dict:
    info, data = run.info, run.data
    summary = {"steps": run.steps_done, "world": info.world_size, "tp": run.tp, "cp": run.cp, "dp": run.dp,
               "chance_loss": data.chance_loss, "launched_by": describe_launch(info.world_size)}
    if info.is_main:
        metrics_path = run.run_dir / "metrics.jsonl"
        rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln] if metrics_path.is_file() else []
        summary["final_loss"] = rows[-1]["loss"] if rows else None
        if run.cfg.train.plot and rows:
            summary["plot"] = plot_loss(metrics_path, run.run_dir / "loss_curve.png", data) is not None
        atomic_write(run.run_dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
        log.info("done: %s", json.dumps(summary))
    shutdown(run.engine)
    return summary

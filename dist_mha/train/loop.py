"""The training loop: start (run dir, lock, resume point), build, train, log, checkpoint, plot, shut down.

Only rank 0 prints progress and writes logs and metrics; every rank raises
on error (torchrun then tears the job down and, with --max-restarts, restarts
it from the last checkpoint). Once a run holds its run dir, an error is
written with its traceback to `train.log` before it propagates.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from dist_mha.checkpoint.atomic_io import atomic_write
from dist_mha.models.decoder import DecoderLM
from dist_mha.parallel import MPU, build_parallel_state
from dist_mha.parallel.tp.grads import clip_grad_norm_
from dist_mha.rng.streams import collect_streams
from dist_mha.train import checkpointing, fsdp
from dist_mha.train.batches import loss_share, step_batch, sum_grads
from dist_mha.train.data import make_data
from dist_mha.train.distributed import group_timeouts, init_distributed, set_group_timeouts, shutdown
from dist_mha.train.faults import inject
from dist_mha.train.plot import plot_loss
from dist_mha.train.run_lock import RunLock
from dist_mha.train.startup import agree_run_dir, describe_launch, from_rank0, plan_start

log = logging.getLogger("dist_mha.train")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


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


def _lr(cfg, step):
    warm = cfg.optim.warmup_steps
    if step < warm:
        return cfg.optim.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.train.steps - warm)
    return cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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
    timeout = timedelta(seconds=float(cfg.parallel.timeout_s))
    for note in plan.notes:
        log.warning(note)
    torch.manual_seed(cfg.train.seed)
    state = build_parallel_state(tp, cp, timeout=timeout)
    seq_len = data.seq_len
    if cfg.parallel.sequence_parallel and seq_len % tp:
        raise ValueError(f"Sequence parallelism needs seq_len divisible by parallel.tp={tp}; the data gives {seq_len}.")
    if cp > 1:
        if hasattr(data, "multiple"):
            data.multiple = 2 * cp  # padded rows of documents split into 2*cp chunks too
        if seq_len % (2 * cp):
            raise ValueError(f"Context parallelism over parallel.cp={cp} ranks cuts each row into 2*cp = {2 * cp} "
                             f"equal chunks; the data gives rows of {seq_len} tokens. Choose cp (or the data's length) "
                             "so that 2*cp divides it.")
    dtype = _DTYPES[cfg.train.dtype]
    m = cfg.model
    mode = cfg.parallel.get("dp_mode", "ddp")
    on_mesh = kind == "dcp"  # DTensor parameters on state.mesh (fsdp2 always writes dcp)
    tp_axis = state.mesh["tp"] if on_mesh and state.mesh is not None else state.tp_group
    cp_axis = (state.mesh["cp"] if on_mesh and state.mesh is not None else state.cp_group) if cp > 1 else None
    cp_args = {"cp_group": cp_axis, "cp_mode": cfg.parallel.get("cp_mode", "ring")} if cp > 1 else {}
    if m.get("name") == "hf":  # a local Hugging Face checkpoint (configs/model/hf.yaml)
        from dist_mha.train import hf_model

        model = hf_model.build(cfg, data, state, info.device, dtype, run_dir, info.is_main, tp_axis, cp_axis)
    else:
        model = DecoderLM(data.vocab_size, seq_len, m.embed_dim, m.num_heads, m.num_layers, m.mlp_ratio, m.dropout,
                          m.attention_dropout, num_kv_heads=m.get("num_kv_heads"), tp_group=tp_axis,
                          sequence_parallel=cfg.parallel.sequence_parallel, **cp_args,
                          dropout_mode=m.dropout_mode, seed=cfg.train.seed, device=info.device, dtype=dtype)
    if cfg.parallel.get("activation_checkpointing"):
        fsdp.checkpoint_blocks(model)
    if mode == "fsdp2" and state.mesh is not None:  # one process: nothing to shard; DCP checkpoints all the same
        fsdp.shard(model, state, cfg.parallel.get("fsdp"))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    manifest = {"config": run_config, "tp": tp, "cp": cp, "dp": dp, "world": info.world_size,
                "dp_mode": mode}

    step = plan.step
    metrics_path = run_dir / "metrics.jsonl"
    if plan.resume_dir is not None and kind == "tp":
        own_seeds = {id(st): st.seed for st in collect_streams(model)}
        meta = checkpointing.load(Path(plan.resume_dir), model, opt, tp_rank=state.tp_rank, tp_size=tp)
        if state.cp_rank > 0:
            checkpointing.restart_own_streams(model, own_seeds, step)
        if info.is_main:
            log.info("resumed from %s at step %d (saved at tp=%d, now tp=%d)", plan.resume_dir, step, meta["tp"], tp)
    if plan.resume_dir is not None and kind == "dcp":
        from dist_mha.train import dcp_checkpoints

        meta = dcp_checkpoints.resume(plan.resume_dir, model, opt, state)
        if info.is_main:
            log.info("resumed from %s at step %d (saved at dp=%s tp=%s cp=%s, now dp=%d tp=%d cp=%d)", plan.resume_dir,
                     step, meta.get("dp"), meta.get("tp"), meta.get("cp"), dp, tp, cp)
    engine = None
    if kind == "deepspeed":
        import deepspeed

        ds_config = {"train_micro_batch_size_per_gpu": cfg.train.batch_size, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": int(cfg.launcher.zero_stage)},
                     "gradient_clipping": cfg.optim.grad_clip, "steps_per_print": 10**9}
        if dtype == torch.bfloat16:
            ds_config["bf16"] = {"enabled": True}
        deepspeed.init_distributed(timeout=timeout)  # wraps our default group; DeepSpeed's comm gets our timeout
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=MPU(state))
        if plan.resume_dir is not None:
            # DeepSpeed owns (ZeRO-partitioned) optimizer state; its own format restores it.
            checkpointing.load_deepspeed(engine, Path(plan.resume_dir))
            if info.is_main:
                log.info("resumed DeepSpeed checkpoint %s at step %d", plan.resume_dir, step)
    if dist.is_initialized():
        set_group_timeouts(timeout)  # groups made by others (DeepSpeed) too
    if info.is_main:
        dropped = _truncate_metrics(metrics_path, step)
        if dropped:
            log.warning("dropped %d metrics rows after step %d: those steps run again", dropped, step)
        n_params = fsdp.local_numel(params)
        engine_name = (f"DeepSpeed ZeRO-{int(cfg.launcher.zero_stage)}" if engine is not None else
                       "PyTorch FSDP2, DCP checkpoints" if mode == "fsdp2" else
                       "PyTorch, DCP checkpoints" if kind == "dcp" else "PyTorch")
        log.info("run dir %s | world %d = tp %d x cp %d x dp %d | %s | %d local parameters | launched by %s | %s | "
                 "%d threads", run_dir, info.world_size, tp, cp, dp, info.device, n_params,
                 describe_launch(info.world_size), engine_name, torch.get_num_threads())
        if dist.is_initialized():
            log.info("process group timeouts (s): %s", sorted(set(group_timeouts().values())))
    t_last, losses, seen = time.perf_counter(), [], 0.0
    model.train()
    while step < cfg.train.steps:
        inject(cfg, info, step, "step")
        lr = _lr(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = step_batch(data, step, state, cfg.train.batch_size, info.device)
        logits = (engine or model)(batch.tokens, segment_ids=batch.segment_ids)
        loss = loss_share(logits, batch, global_mean=engine is None)
        if engine is not None:
            engine.backward(loss)
            engine.step()
        elif on_mesh:
            opt.zero_grad(set_to_none=True)
            (loss * (dp * cp)).backward()  # FSDP (or reduce_mesh_grads) averages over DP, DTensor over CP
            if mode == "ddp":
                fsdp.reduce_mesh_grads(params, state)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)  # DTensor gradients: the global norm
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sum_grads(params, state.dp_cp_group)  # each rank's share: the sum is the step's gradient
            if cfg.optim.grad_clip:
                clip_grad_norm_(params, cfg.optim.grad_clip, state.tp_group)
            opt.step()
        step += 1
        if step == plan.step + 1 and dist.is_initialized():
            set_group_timeouts(timeout)  # groups created lazily in the first step (e.g. gloo twins of NCCL groups)
        losses.append(loss.detach())
        seen += batch.tokens_seen
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            mean = torch.stack(losses).mean()
            if engine is not None and dp > 1:
                dist.all_reduce(mean, group=state.dp_group)
                mean /= dp
            elif engine is None and dp * cp > 1:
                dist.all_reduce(mean, group=state.dp_cp_group)  # the ranks' shares add up to the step's mean
            losses = []
            now = time.perf_counter()
            tok_s = seen / max(now - t_last, 1e-9)  # non-padding tokens over every DP rank
            t_last, seen = now, 0.0
            if info.is_main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"step": step, "loss": mean.item(), "lr": lr, "tokens_per_s": round(tok_s, 1)}) + "\n")
                if cfg.train.progress:
                    done = int(30 * step / cfg.train.steps)
                    print(f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{cfg.train.steps} loss {mean.item():.4f} "
                          f"{tok_s:,.0f} tok/s", end="" if step < cfg.train.steps else "\n", file=sys.stderr, flush=True)
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
            if engine is not None:
                checkpointing.save_deepspeed(engine, run_dir, step, manifest)
            elif kind == "dcp":
                from dist_mha.train import dcp_checkpoints

                meta = {"step": step, "tp": tp, "cp": cp, "dp": dp}
                dcp_checkpoints.save(run_dir, step, model, opt, meta, manifest=manifest,
                                     after_shard=inject(cfg, info, step, "save"))
            else:
                meta = {"step": step, "tp": tp, "dp": dp, "torch_rng": torch.get_rng_state()}
                # One writer per TP rank: DP rank 0 of CP rank 0 (the model is replicated over DP x CP).
                checkpointing.save(run_dir, step, model, opt, meta, tp_rank=state.tp_rank, tp_size=tp,
                                   dp_rank=state.dp_rank + state.cp_rank, manifest=manifest,
                                   after_shard=inject(cfg, info, step, "save"))
            if cfg.train.stop_at_step is not None and step >= cfg.train.stop_at_step:
                break  # a clean interruption right after a checkpoint (resume tests, time limits)

    summary = {"steps": step, "world": info.world_size, "tp": tp, "cp": cp, "dp": dp, "chance_loss": data.chance_loss,
               "launched_by": describe_launch(info.world_size)}
    if info.is_main:
        rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln] if metrics_path.is_file() else []
        summary["final_loss"] = rows[-1]["loss"] if rows else None
        if cfg.train.plot and rows:
            summary["plot"] = plot_loss(metrics_path, run_dir / "loss_curve.png", data) is not None
        atomic_write(run_dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
        log.info("done: %s", json.dumps(summary))
    shutdown(engine)
    return summary

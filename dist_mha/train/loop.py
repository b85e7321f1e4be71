"""The training loop: build, resume, train, log, checkpoint, plot.

Only rank 0 prints progress and writes logs and metrics; every rank raises
on error (torchrun then tears the job down and, with --max-restarts, restarts
it from the last checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_mha.models.decoder import DecoderLM
from dist_mha.parallel import MPU, build_parallel_state
from dist_mha.parallel.grads import clip_grad_norm_
from dist_mha.train import checkpointing
from dist_mha.train.data import make_data
from dist_mha.train.distributed import init_distributed

log = logging.getLogger("dist_mha.train")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _setup_logging(run_dir: Path, is_main: bool) -> None:
    root = logging.getLogger("dist_mha")
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


def _allreduce_grads(params, group, size):
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops metrics of steps after the checkpoint we resume from: each step is logged once."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def _plot(metrics_path: Path, out: Path, chance: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping the loss-curve PNG (pip install 'dist_mha[launch]')")
        return False
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss (answer tokens)")
    ax.axhline(chance, color="gray", linestyle="--", label=f"best without attention = {chance:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def train(cfg, run_dir) -> dict:
    """Runs one training job described by the Hydra config `cfg` in `run_dir`; returns a summary."""
    run_dir = Path(run_dir)
    info = init_distributed(cfg.train.device, cfg.parallel.backend, cfg.parallel.timeout_s)
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir, info.is_main)
    tp = int(cfg.parallel.tp)
    if info.world_size % tp:
        raise ValueError(f"Received parallel.tp={tp} with {info.world_size} processes; tp must divide the world size.")
    dp = info.world_size // tp
    if cfg.parallel.dp not in (None, "auto") and int(cfg.parallel.dp) != dp:
        raise ValueError(f"Received parallel.dp={cfg.parallel.dp} but world {info.world_size} / tp {tp} gives dp={dp}.")
    torch.manual_seed(cfg.train.seed)
    state = build_parallel_state(tp)
    data = make_data(cfg.data, cfg.train.seed)
    seq_len = data.seq_len
    if cfg.parallel.sequence_parallel and seq_len % tp:
        raise ValueError(f"Sequence parallelism needs seq_len divisible by parallel.tp={tp}; the data gives {seq_len}.")
    dtype = _DTYPES[cfg.train.dtype]
    m = cfg.model
    model = DecoderLM(data.vocab_size, seq_len, m.embed_dim, m.num_heads, m.num_layers, m.mlp_ratio, m.dropout,
                      m.attention_dropout, num_kv_heads=m.get("num_kv_heads"), tp_group=state.tp_group,
                      sequence_parallel=cfg.parallel.sequence_parallel,
                      dropout_mode=m.dropout_mode, seed=cfg.train.seed, device=info.device, dtype=dtype)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)

    step = 0
    metrics_path = run_dir / "metrics.jsonl"
    deepspeed_run = cfg.launcher.name == "deepspeed"
    resume_from = checkpointing.latest(run_dir) if cfg.train.resume and not deepspeed_run else None
    if resume_from is not None:
        meta = checkpointing.load(resume_from, model, opt, tp_rank=state.tp_rank, tp_size=tp)
        step = meta["step"]
        if info.is_main:
            _truncate_metrics(metrics_path, step)
            log.info("resumed from %s at step %d (saved at tp=%d, now tp=%d)", resume_from, step, meta["tp"], tp)

    engine = None
    if deepspeed_run:
        import deepspeed

        ds_config = {"train_micro_batch_size_per_gpu": cfg.train.batch_size, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": int(cfg.launcher.zero_stage)},
                     "gradient_clipping": cfg.optim.grad_clip, "steps_per_print": 10**9}
        if dtype == torch.bfloat16:
            ds_config["bf16"] = {"enabled": True}
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=MPU(state))
        ds_dir = run_dir / "deepspeed_checkpoints"
        if cfg.train.resume and (ds_dir / "latest").is_file():
            # DeepSpeed owns (ZeRO-partitioned) optimizer state; its own format restores it.
            _, client = engine.load_checkpoint(str(ds_dir))
            step = client["step"]
            if info.is_main:
                _truncate_metrics(metrics_path, step)
                log.info("resumed DeepSpeed checkpoint at step %d", step)

    if info.is_main:
        n_params = sum(p.numel() for p in params)
        log.info("run dir %s | world %d = tp %d x dp %d | %s | %d local parameters | launcher %s",
                 run_dir, info.world_size, tp, dp, info.device, n_params, cfg.launcher.name)
    tokens_per_step = cfg.train.batch_size * seq_len * dp
    t_last, losses = time.perf_counter(), []
    model.train()
    while step < cfg.train.steps:
        if cfg.train.fail_at_step is not None and step == cfg.train.fail_at_step and info.restart == 0 \
                and info.rank == cfg.train.fail_rank:
            log.error("fault injection: rank %d exits at step %d", info.rank, step)
            os._exit(13)
        lr = _lr(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        tokens, targets, mask = (t.to(info.device) for t in data.batch(step, state.dp_rank, cfg.train.batch_size))
        logits = (engine or model)(tokens)
        picked = logits[mask]
        # Half-precision logits are upcast for a stable softmax; float64 stays float64.
        loss = F.cross_entropy(picked.float() if picked.dtype in (torch.float16, torch.bfloat16) else picked, targets[mask])
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if dp > 1:
                _allreduce_grads(params, state.dp_group, dp)
            if cfg.optim.grad_clip:
                clip_grad_norm_(params, cfg.optim.grad_clip, state.tp_group)
            opt.step()
        step += 1
        losses.append(loss.detach())
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            mean = torch.stack(losses).mean()
            if dp > 1:
                dist.all_reduce(mean, group=state.dp_group)
                mean /= dp
            losses = []
            now = time.perf_counter()
            tok_s = tokens_per_step * cfg.train.log_every / max(now - t_last, 1e-9)
            t_last = now
            if info.is_main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"step": step, "loss": mean.item(), "lr": lr, "tokens_per_s": round(tok_s, 1)}) + "\n")
                if cfg.train.progress:
                    done = int(30 * step / cfg.train.steps)
                    print(f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{cfg.train.steps} loss {mean.item():.4f} "
                          f"{tok_s:,.0f} tok/s", end="" if step < cfg.train.steps else "\n", file=sys.stderr, flush=True)
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
            if engine is not None:
                engine.save_checkpoint(str(run_dir / "deepspeed_checkpoints"), tag=f"step_{step:08d}",
                                       client_state={"step": step})
            else:
                meta = {"step": step, "tp": tp, "dp": dp, "torch_rng": torch.get_rng_state()}
                checkpointing.save(run_dir, step, model, opt, meta, tp_rank=state.tp_rank, tp_size=tp,
                                   dp_rank=state.dp_rank)
            if cfg.train.stop_at_step is not None and step >= cfg.train.stop_at_step:
                break  # a clean interruption right after a checkpoint (resume tests, time limits)

    summary = {"steps": step, "world": info.world_size, "tp": tp, "dp": dp, "chance_loss": data.chance_loss}
    if info.is_main:
        rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln]
        summary["final_loss"] = rows[-1]["loss"] if rows else None
        if cfg.train.plot:
            summary["plot"] = _plot(metrics_path, run_dir / "loss_curve.png", data.chance_loss)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done: %s", json.dumps(summary))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary

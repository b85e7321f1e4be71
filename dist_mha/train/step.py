"""One training step (forward, backward, gradient reduction, clipping, update), its metrics and checkpoints.

Three ways to reduce gradients, by how the run holds its parameters:
DeepSpeed's engine; DTensor parameters on a mesh (FSDP2 or `reduce_mesh_grads`
average over DP, DTensor's own backward sums over CP); plain process groups
(each rank's loss is its share of the global mean, so gradients are summed).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.distributed as dist

from dist_mha.parallel.tp.grads import clip_grad_norm_
from dist_mha.train import checkpointing, fsdp
from dist_mha.train.batches import loss_share, step_batch, sum_grads
from dist_mha.train.faults import inject
from dist_mha.train.setup import Run


def lr_at(cfg, step: int) -> float:
    """Linear warm-up for `optim.warmup_steps`, then cosine decay to 0 at `train.steps`."""
    warm = cfg.optim.warmup_steps
    if step < warm:
        return cfg.optim.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.train.steps - warm)
    return cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_step(run: Run, step: int):
    """Runs step `step` at its learning rate; returns `(loss, batch)` (the loss is this rank's share)."""
    cfg, params = run.cfg, run.params
    for g in run.opt.param_groups:
        g["lr"] = lr_at(cfg, step)
    batch = step_batch(run.data, step, run.state, cfg.train.batch_size, run.info.device)
    logits = (run.engine or run.model)(batch.tokens, segment_ids=batch.segment_ids)
    loss = loss_share(logits, batch, global_mean=run.engine is None)
    if run.engine is not None:
        run.engine.backward(loss)
        run.engine.step()
        return loss, batch
    run.opt.zero_grad(set_to_none=True)
    if run.on_mesh:
        (loss * (run.dp * run.cp)).backward()  # FSDP (or reduce_mesh_grads) averages over DP, DTensor over CP
        if run.mode == "ddp":
            fsdp.reduce_mesh_grads(params, run.state)
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)  # DTensor gradients: the global norm
    else:
        loss.backward()
        sum_grads(params, run.state.dp_cp_group)  # each rank's share: the sum is the step's gradient
        if cfg.optim.grad_clip:
            clip_grad_norm_(params, cfg.optim.grad_clip, run.state.tp_group)
    run.opt.step()
    return loss, batch


def global_mean_loss(run: Run, losses: list) -> torch.Tensor:
    """The mean loss of the steps in `losses` over every rank (a collective: every rank calls it)."""
    mean = torch.stack(losses).mean()
    if run.engine is not None and run.dp > 1:
        dist.all_reduce(mean, group=run.state.dp_group)
        mean /= run.dp
    elif run.engine is None and run.dp * run.cp > 1:
        dist.all_reduce(mean, group=run.state.dp_cp_group)  # the ranks' shares add up to the step's mean
    return mean


class Meter:
    """Rank 0's metrics rows (`metrics.jsonl`) and progress bar; non-padding tokens/s over every DP rank."""

    def __init__(self, run: Run):
        self.run, self.path = run, run.run_dir / "metrics.jsonl"
        self.t_last, self.seen = time.perf_counter(), 0.0

    def log(self, step: int, mean: torch.Tensor) -> None:
        now = time.perf_counter()
        tok_s = self.seen / max(now - self.t_last, 1e-9)
        self.t_last, self.seen = now, 0.0
        if not self.run.info.is_main:
            return
        cfg, value = self.run.cfg, mean.item()
        row = {"step": step, "loss": value, "lr": lr_at(cfg, step - 1), "tokens_per_s": round(tok_s, 1)}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if cfg.train.progress:
            done = int(30 * step / cfg.train.steps)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{cfg.train.steps} loss {value:.4f} "
                  f"{tok_s:,.0f} tok/s", end="" if step < cfg.train.steps else "\n", file=sys.stderr, flush=True)


def save(run: Run, step: int) -> None:
    """Checkpoints step `step` in the run's format (DeepSpeed's, DCP, or one shard file per TP rank)."""
    cfg, state = run.cfg, run.state
    after_shard = inject(cfg, run.info, step, "save")
    if run.engine is not None:
        checkpointing.save_deepspeed(run.engine, run.run_dir, step, run.manifest)
    elif run.kind == "dcp":
        from dist_mha.train import dcp_checkpoints

        meta = {"step": step, "tp": run.tp, "cp": run.cp, "dp": run.dp}
        dcp_checkpoints.save(run.run_dir, step, run.model, run.opt, meta, manifest=run.manifest,
                             after_shard=after_shard)
    else:
        meta = {"step": step, "tp": run.tp, "dp": run.dp, "torch_rng": torch.get_rng_state()}
        # One writer per TP rank: DP rank 0 of CP rank 0 (the model is replicated over DP x CP).
        checkpointing.save(run.run_dir, step, run.model, run.opt, meta, tp_rank=state.tp_rank, tp_size=run.tp,
                           dp_rank=state.dp_rank + state.cp_rank, manifest=run.manifest, after_shard=after_shard)

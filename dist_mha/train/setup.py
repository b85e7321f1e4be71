"""What a run is made of before its first step: the layout checks, the model, the optimizer, a resume, DeepSpeed.

`Run` carries those pieces (and the layout they were built for) through the
training loop (`train/loop.py`), the step (`train/step.py`) and checkpointing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from dist_mha.models.decoder import DecoderLM
from dist_mha.parallel import MPU
from dist_mha.rng.streams import collect_streams
from dist_mha.train import checkpointing, fsdp

log = logging.getLogger("dist_mha.train")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class Run:
    """One rank's view of a training run (built by `build_run`)."""

    cfg: Any
    info: Any  # train.distributed.DistInfo
    state: Any  # parallel.ParallelState
    run_dir: Path
    data: Any
    kind: str  # checkpoint kind: "tp" (shards), "dcp" or "deepspeed"
    tp: int
    cp: int
    dp: int
    timeout: timedelta
    dtype: torch.dtype = torch.float32
    model: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    engine: Any = None  # the DeepSpeed engine, when launcher=deepspeed
    manifest: dict = field(default_factory=dict)
    steps_done: int = 0

    @property
    def mode(self) -> str:
        return self.cfg.parallel.get("dp_mode", "ddp")

    @property
    def on_mesh(self) -> bool:
        """DTensor parameters on `state.mesh` (fsdp2 always writes DCP checkpoints)."""
        return self.kind == "dcp"

    @property
    def params(self) -> list:
        return list(self.model.parameters())


def check_layout(cfg, data, tp: int, cp: int) -> None:
    """Refuses sequence/context parallel degrees the data's row length cannot be cut into.

    Raises:
        ValueError: naming the degree, the row length and the fix.
    """
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


def _axes(run: Run):
    """The TP and CP axes the model is built on: mesh axes for DTensor parameters, else process groups."""
    mesh = run.state.mesh if run.on_mesh else None
    tp_axis = mesh["tp"] if mesh is not None else run.state.tp_group
    cp_axis = None if run.cp == 1 else mesh["cp"] if mesh is not None else run.state.cp_group
    return tp_axis, cp_axis


def build_model(run: Run, run_config: dict) -> None:
    """The model (ours or a local Hugging Face checkpoint), block checkpointing, FSDP2 sharding, the optimizer."""
    cfg, m = run.cfg, run.cfg.model
    run.dtype = DTYPES[cfg.train.dtype]
    tp_axis, cp_axis = _axes(run)
    if m.get("name") == "hf":  # a local Hugging Face checkpoint (configs/model/hf.yaml)
        from dist_mha.train import hf_model

        run.model = hf_model.build(cfg, run.data, run.state, run.info.device, run.dtype, run.run_dir,
                                   run.info.is_main, tp_axis, cp_axis)
    else:
        cp_args = {"cp_group": cp_axis, "cp_mode": cfg.parallel.get("cp_mode", "ring")} if run.cp > 1 else {}
        run.model = DecoderLM(run.data.vocab_size, run.data.seq_len, m.embed_dim, m.num_heads, m.num_layers,
                              m.mlp_ratio, m.dropout, m.attention_dropout, num_kv_heads=m.get("num_kv_heads"),
                              tp_group=tp_axis, sequence_parallel=cfg.parallel.sequence_parallel, **cp_args,
                              dropout_mode=m.dropout_mode, seed=cfg.train.seed, device=run.info.device,
                              dtype=run.dtype)
    if cfg.parallel.get("activation_checkpointing"):
        fsdp.checkpoint_blocks(run.model)
    if run.mode == "fsdp2" and run.state.mesh is not None:  # one process: nothing to shard; DCP all the same
        fsdp.shard(run.model, run.state, cfg.parallel.get("fsdp"))
    run.opt = torch.optim.AdamW(run.params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay)
    run.manifest = {"config": run_config, "tp": run.tp, "cp": run.cp, "dp": run.dp, "world": run.info.world_size,
                    "dp_mode": run.mode}


def resume(run: Run, plan) -> None:
    """Loads the plan's checkpoint (our shards or DCP) into the model and optimizer; DeepSpeed's comes later."""
    if plan.resume_dir is None or run.kind == "deepspeed":
        return
    if run.kind == "tp":
        own_seeds = {id(st): st.seed for st in collect_streams(run.model)}
        meta = checkpointing.load(Path(plan.resume_dir), run.model, run.opt, tp_rank=run.state.tp_rank,
                                  tp_size=run.tp)
        if run.state.cp_rank > 0:
            checkpointing.restart_own_streams(run.model, own_seeds, plan.step)
        if run.info.is_main:
            log.info("resumed from %s at step %d (saved at tp=%d, now tp=%d)", plan.resume_dir, plan.step,
                     meta["tp"], run.tp)
    else:
        from dist_mha.train import dcp_checkpoints

        meta = dcp_checkpoints.resume(plan.resume_dir, run.model, run.opt, run.state)
        if run.info.is_main:
            log.info("resumed from %s at step %d (saved at dp=%s tp=%s cp=%s, now dp=%d tp=%d cp=%d)",
                     plan.resume_dir, plan.step, meta.get("dp"), meta.get("tp"), meta.get("cp"), run.dp, run.tp,
                     run.cp)


def start_deepspeed(run: Run, plan) -> None:
    """Wraps model and optimizer in a DeepSpeed engine (launcher=deepspeed) and restores its checkpoint."""
    if run.kind != "deepspeed":
        return
    import deepspeed

    cfg = run.cfg
    ds_config = {"train_micro_batch_size_per_gpu": cfg.train.batch_size, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": int(cfg.launcher.zero_stage)},
                 "gradient_clipping": cfg.optim.grad_clip, "steps_per_print": 10**9}
    if run.dtype == torch.bfloat16:
        ds_config["bf16"] = {"enabled": True}
    deepspeed.init_distributed(timeout=run.timeout)  # wraps our default group; DeepSpeed's comm gets our timeout
    run.engine, run.opt, _, _ = deepspeed.initialize(model=run.model, optimizer=run.opt, config=ds_config,
                                                     mpu=MPU(run.state))
    if plan.resume_dir is not None:
        # DeepSpeed owns (ZeRO-partitioned) optimizer state; its own format restores it.
        checkpointing.load_deepspeed(run.engine, Path(plan.resume_dir))
        if run.info.is_main:
            log.info("resumed DeepSpeed checkpoint %s at step %d", plan.resume_dir, plan.step)

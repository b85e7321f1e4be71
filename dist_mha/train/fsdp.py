"""Data parallelism of the training app: `parallel.dp_mode=ddp|fsdp2`, on the model's DeviceMesh.

- `ddp` with process groups (the default, `train.checkpoint_format=shards`):
  plain per-rank parameters; after backward the gradients are summed over
  DP x CP in one flat all-reduce (`batches.sum_grads`). torch's
  `DistributedDataParallel` is not used: it refuses DTensor parameters and
  would average over DP only.
- `ddp` with DTensor parameters (`train.checkpoint_format=dcp`): the model is
  built on `state.mesh`; after backward each DTensor gradient is reduced to
  its parameter's placements (TP partial sums, CP average) and the local
  gradients are averaged over DP (`reduce_mesh_grads`).
- `fsdp2`: the model is built on `state.mesh` and `fully_shard(...,
  mesh=state.mesh["dp"])` is applied per block, then on the root, with the
  `MixedPrecisionPolicy` of `parallel.fsdp`. Parameters, gradients and Adam
  state are sharded over DP; FSDP averages gradients over DP and the
  parameters' DTensor placements average them over CP.

In both mesh modes each rank's loss share (the sum over its scored tokens
divided by the step's global count) is scaled by DP x CP before backward,
so that averaging gives the sum of the shares: the exact step mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}
MODES = ("ddp", "fsdp2")


def mixed_precision(fsdp_cfg):
    """FSDP2's `MixedPrecisionPolicy` from `parallel.fsdp` (`param_dtype`, `reduce_dtype`, `output_dtype`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    def dtype(key):
        value = fsdp_cfg.get(key) if fsdp_cfg is not None else None
        if value not in _DTYPES:
            raise ValueError(f"Received parallel.fsdp.{key}={value!r}; expected null or one of "
                             f"{sorted(k for k in _DTYPES if k)}.")
        return _DTYPES[value]

    return MixedPrecisionPolicy(param_dtype=dtype("param_dtype"), reduce_dtype=dtype("reduce_dtype"),
                                output_dtype=dtype("output_dtype"))


def checkpoint_blocks(model) -> None:
    """Activation checkpointing per block (torch's composable `checkpoint`: parameter names unchanged).

    Dropout masks are replayed in the recomputation (`dist_mha.rng.replay`).
    """
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        checkpoint(block)


def shard(model, state, fsdp_cfg):
    """`fully_shard` over `state.mesh["dp"]` per block, then on the root; returns the model."""
    from torch.distributed.fsdp import fully_shard

    dp = state.mesh["dp"]
    kwargs = {"mp_policy": mixed_precision(fsdp_cfg)}
    if fsdp_cfg is not None and fsdp_cfg.get("reshard_after_forward") is not None:
        kwargs["reshard_after_forward"] = bool(fsdp_cfg.reshard_after_forward)
    for block in model.blocks:
        fully_shard(block, mesh=dp, **kwargs)
    fully_shard(model, mesh=dp, **kwargs)
    return model


def reduce_mesh_grads(params, state) -> None:
    """`ddp` with DTensor parameters: gradients in their parameters' placements, averaged over DP."""
    from dist_mha.parallel.dtensor import reduce_grads

    params = [p for p in params if p.grad is not None]
    reduce_grads(params)
    if state.dp_size == 1:
        return
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=state.dp_group)
    flat /= state.dp_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def local_numel(params) -> int:
    """Elements this rank holds (a DTensor counts its local shard)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)


def checkpoint_kind(cfg) -> str:
    """"deepspeed", "dcp" or "tp" (per-rank shards), from the launcher, `parallel.dp_mode` and `train.checkpoint_format`."""
    mode = cfg.parallel.get("dp_mode", "ddp")
    if mode not in MODES:
        raise ValueError(f"Received parallel.dp_mode={mode!r}; expected one of {MODES}.")
    fmt = cfg.train.get("checkpoint_format") or ("dcp" if mode == "fsdp2" else "shards")
    if fmt not in ("dcp", "shards"):
        raise ValueError(f"Received train.checkpoint_format={fmt!r}; expected dcp, shards or null (dcp with "
                         "parallel.dp_mode=fsdp2, shards with ddp).")
    if cfg.launcher.name == "deepspeed":
        if mode != "ddp" or cfg.train.get("checkpoint_format") == "dcp":
            raise ValueError("launcher=deepspeed shards with ZeRO and writes its own checkpoints: it runs with "
                             "parallel.dp_mode=ddp and no train.checkpoint_format. Drop launcher=deepspeed to use "
                             f"fsdp2 or dcp (got parallel.dp_mode={mode}, train.checkpoint_format={fmt}).")
        return "deepspeed"
    if mode == "fsdp2" and fmt == "shards":
        raise ValueError("train.checkpoint_format=shards writes each TP rank's local tensors, which "
                         "parallel.dp_mode=fsdp2 shards further over DP; use train.checkpoint_format=dcp (the default "
                         "with fsdp2; it resumes at any DP, TP and CP degree).")
    return "dcp" if fmt == "dcp" else "tp"

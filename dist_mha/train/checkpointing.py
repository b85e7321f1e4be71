"""Training checkpoints: model, optimizer, RNG streams, data position and step.

Layout: `<run_dir>/checkpoints/step_NNNNNNNN/tpRRR-of-SSS.pt`, one file per TP
rank written by DP rank 0 of its TP group (model and optimizer are replicated
across DP), each atomically (temp file + rename); after every rank has
written, rank 0 points `<run_dir>/checkpoints/latest` at it (also atomically),
so a crash mid-save leaves the previous checkpoint in force.

A file is one flat dict: `model.<key>` for the model's state dict, and for
each per-parameter optimizer tensor (Adam's moments) `optim.<field>.<param>`,
with the sharded modules' `_extra_state` copied under every prefix, so
`dist_mha.parallel.checkpoint.reshard_state_dicts` reshards optimizer state
exactly like weights. Loading at another TP degree therefore restores model
and optimizer. The data position is the step (batches are a function of it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from dist_mha.parallel.checkpoint import load_tp_shard, save_tp_shard

_EXTRA = "_extra_state"


def _flatten(model, optimizer, meta) -> dict:
    sd = model.state_dict()
    flat = {f"model.{k}": v for k, v in sd.items()}
    extras = {k: v for k, v in sd.items() if k.endswith(_EXTRA)}
    names = {id(p): n for n, p in model.named_parameters()}
    fields: dict[str, dict] = {}
    scalars: dict[str, dict] = {}
    for p, st in optimizer.state.items():
        name = names[id(p)]
        for field, value in st.items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape and value.dim() > 0:
                fields.setdefault(field, {})[name] = value
            else:
                scalars.setdefault(name, {})[field] = value
    for field, tensors in fields.items():
        flat.update({f"optim.{field}.{n}": t for n, t in tensors.items()})
        flat.update({f"optim.{field}.{k}": v for k, v in extras.items()})
    flat["optim_scalars"] = scalars
    flat["optim_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    flat["meta"] = meta
    return flat


def _unflatten_into(flat: dict, model, optimizer) -> dict:
    model.load_state_dict({k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    state: dict[str, dict] = {n: dict(s) for n, s in flat["optim_scalars"].items()}
    for key, value in flat.items():
        if key.startswith("optim.") and not key.endswith(_EXTRA):
            field, name = key[len("optim."):].split(".", 1)
            state.setdefault(name, {})[field] = value
    order = [id(p) for g in optimizer.param_groups for p in g["params"]]
    by_id = {id(p): n for n, p in params.items()}
    osd = {"state": {i: state[by_id[pid]] for i, pid in enumerate(order) if by_id[pid] in state},
           "param_groups": []}
    start = 0
    for group, saved in zip(optimizer.param_groups, flat["optim_groups"]):
        ids = list(range(start, start + len(group["params"])))
        osd["param_groups"].append({**saved, "params": ids})
        start += len(group["params"])
    optimizer.load_state_dict(osd)
    return flat["meta"]


def save(run_dir, step: int, model, optimizer, meta: dict, *, tp_rank: int, tp_size: int, dp_rank: int) -> Path:
    """Every rank calls this (it synchronises); returns the checkpoint directory."""
    ckpt = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    if dp_rank == 0:
        save_tp_shard(_flatten(model, optimizer, meta), ckpt, tp_rank, tp_size)
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        latest = Path(run_dir) / "checkpoints" / "latest"
        tmp = latest.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(ckpt.name)
        os.replace(tmp, latest)
    if dist.is_initialized():
        dist.barrier()
    return ckpt


def latest(run_dir) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text().strip()


def load_model_state(ckpt_dir, tp_group) -> dict:
    """The model's state dict from a checkpoint directory, resharded to `tp_group`'s degree (no optimizer)."""
    from dist_mha.parallel import sharding

    flat = load_tp_shard(ckpt_dir, sharding.tp_size_of(tp_group), sharding.tp_rank_of(tp_group))
    return {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}


def load(ckpt_dir, model, optimizer, *, tp_rank: int, tp_size: int) -> dict:
    """Restores model and optimizer (resharding if the TP degree changed); returns the saved meta."""
    return _unflatten_into(load_tp_shard(ckpt_dir, tp_size, tp_rank), model, optimizer)

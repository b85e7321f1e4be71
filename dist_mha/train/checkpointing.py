"""Training checkpoints: model, optimizer, RNG streams, data position and step.

Layout: `<run_dir>/checkpoints/step_NNNNNNNN/tpRRR-of-SSS.pt` (+ `.sha256`
sidecars), one file per TP rank written by DP rank 0 of its TP group (model
and optimizer are replicated across DP). A step is written into
`.step_NNNNNNNN.partial/`; once every rank has written its shard, rank 0 adds
`manifest.json` (sizes, sha256, config) and renames the directory into place,
then moves the `latest` pointer. A crash mid-save leaves only the partial
directory, which the next start removes (see `dist_mha.train.run_dir`).
DeepSpeed checkpoints (`save_deepspeed`) follow the same protocol in
`deepspeed_checkpoints/`.

A file is one flat dict: `model.<key>` for the model's state dict, and for
each per-parameter optimizer tensor (Adam's moments) `optim.<field>.<param>`,
with the sharded modules' `_extra_state` copied under every prefix, so
`dist_mha.parallel.tp.reshard.reshard_state_dicts` reshards optimizer state
exactly like weights. Loading at another TP degree therefore restores model
and optimizer. The data position is the step (batches are a function of it).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from dist_mha.checkpoint.shards import CheckpointError, load_tp_shard, save_tp_shard
from dist_mha.rng.streams import collect_streams, stream_seed
from dist_mha.train.run_dir import ROOTS, partial_dir, publish, shard_digests, step_name, write_manifest

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


def _agree(ok: bool, error: BaseException | None, what: str) -> None:
    """Every rank learns whether every rank succeeded; the failing rank re-raises, the others say who failed."""
    if dist.is_initialized():
        # NCCL's default group only takes CUDA tensors.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([0 if ok else dist.get_rank() + 1], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = int(flag.item()) - 1
    else:
        failed = -1 if ok else 0
    if error is not None:
        raise error
    if failed >= 0:
        raise RuntimeError(f"{what} failed on rank {failed} (its error says why); this rank stops too.")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _begin(root: Path, step: int) -> Path:
    partial = partial_dir(root, step)
    if _is_rank0():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    return partial


def _finish(root: Path, step: int, partial: Path, files, meta: dict, kind: str) -> Path:
    final = root / step_name(step)
    ok, error = True, None
    if _is_rank0():
        try:
            write_manifest(partial, step=step, kind=kind, files=files(), meta=meta)
            publish(partial, final)
        except BaseException as e:
            ok, error = False, e
            shutil.rmtree(partial, ignore_errors=True)
    _agree(ok, error, f"Publishing checkpoint {final}")
    return final


def save(run_dir, step: int, model, optimizer, meta: dict, *, tp_rank: int, tp_size: int, dp_rank: int,
         manifest: dict | None = None, after_shard=None) -> Path:
    """Every rank calls this (it synchronises); returns the published step directory.

    Args:
        manifest: extra fields for `manifest.json` (the model config, TP and DP degrees).
        after_shard: called on the writing ranks right after their shard (fault injection).

    Raises:
        OSError: naming the file and what to do, when the disk is full; no
            temporary file or partial step is left behind.
    """
    root = Path(run_dir) / ROOTS["tp"]
    partial = _begin(root, step)
    ok, error = True, None
    if dp_rank == 0:
        try:
            save_tp_shard(_flatten(model, optimizer, meta), partial, tp_rank, tp_size)
            if after_shard is not None:
                after_shard()
        except BaseException as e:
            ok, error = False, e
    try:
        _agree(ok, error, f"Writing checkpoint shards into {partial}")
    except BaseException:
        if _is_rank0():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return _finish(root, step, partial, lambda: shard_digests(partial, tp_size),
                   {"tp": tp_size, **(manifest or {})}, "tp")


def load_model_state(ckpt_dir, tp_group) -> dict:
    """The model's state dict from a checkpoint directory, resharded to `tp_group`'s degree (no optimizer)."""
    from dist_mha.parallel.groups import rank_of, size_of

    flat = load_tp_shard(ckpt_dir, size_of(tp_group), rank_of(tp_group))
    return {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}


def load(ckpt_dir, model, optimizer, *, tp_rank: int, tp_size: int) -> dict:
    """Restores model and optimizer (resharding if the TP degree changed); returns the saved meta.

    Every file read is verified against its checksum first (`load_tp_shard`).
    """
    return _unflatten_into(load_tp_shard(ckpt_dir, tp_size, tp_rank), model, optimizer)


def save_deepspeed(engine, run_dir, step: int, manifest: dict) -> Path:
    """DeepSpeed's own checkpoint (ZeRO-partitioned optimizer), written and published like `save`."""
    root = Path(run_dir) / ROOTS["deepspeed"]
    partial = _begin(root, step)
    ok, error = True, None
    try:
        engine.save_checkpoint(str(root), tag=partial.name, client_state={"step": step}, save_latest=False)
    except (OSError, RuntimeError) as e:
        ok = False
        error = OSError(getattr(e, "errno", None) or errno.EIO,
                        f"Could not write the DeepSpeed checkpoint into {partial} ({e}); "
                        f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free there. If the disk is full, free "
                        "space and rerun the same command: the run resumes from its last complete checkpoint.")
    try:
        _agree(ok, error, f"Writing the DeepSpeed checkpoint into {partial}")
    except BaseException:
        if _is_rank0():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    files = lambda: {f.relative_to(partial).as_posix(): None for f in sorted(partial.rglob("*")) if f.is_file()}
    return _finish(root, step, partial, files, manifest, "deepspeed")


def load_deepspeed(engine, step_dir: Path) -> int:
    """Loads a verified DeepSpeed step directory; returns its step."""
    _, client = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {step_dir}.", step_dir)
    return int(client["step"])


def restart_own_streams(model, own_seeds: dict, step: int) -> None:
    """After a resume on a CP rank > 0: restarts the streams of this rank's own rows at `step`.

    The checkpoint holds CP rank 0's streams. Streams that draw for this
    rank's own rows (per-rank attention dropout under Ulysses, residual
    dropout) must not copy rank 0's, and must not restart from their seed
    either (that would repeat the masks of step 0): they restart from their
    seed mixed with the resume step. `own_seeds`: `{id(stream): seed}` of the
    model as built, before loading.
    """
    for st in collect_streams(model):
        if st.name in ("attention_dropout", "residual"):
            st.seed = stream_seed(own_seeds[id(st)], "resume", step)
            st.restore({})

"""Distributed checkpoints (`torch.distributed.checkpoint`) of models with DTensor parameters.

DCP stores every tensor once, by its global shape: each rank writes the
shards it owns and reads, at load, the parts its own layout needs, so a
checkpoint saved at DP2 x TP2 loads at TP4, at TP1 or at DP2 x CP2. The
model and optimizer go through `torch.distributed.checkpoint.state_dict`
(FQNs without FSDP's or `checkpoint_wrapper`'s prefixes).

What is per rank is kept apart: the modules' `_extra_state` (RNG stream
positions, TP layout) is left out of the model dict, since DCP keeps one
copy of each key and would hand every rank the same rank's streams. Instead
each layout position saves its own blob `rank_state/<cp..._tp...>` (the
extra states and `meta`, `torch.save`d into a uint8 tensor). At the same
layout every rank gets its own back; at another layout every rank takes
the first position's, and per-rank attention-dropout streams restart from
their seeds (what `dist_mha.checkpoint.shards` does when resharding).

Integrity: `write` adds `SHA256SUMS` (`sha256sum -c` format) for every file;
`load` checks every file against it first (the ranks split the files), so
corrupt bytes are reported by name and never unpickled (DCP reads its
`.metadata` with pickle); non-tensor items are read with
`torch.load(weights_only=True)`. `save` writes into a hidden partial
directory and renames it into place.

Example:

>>> save(directory, model, optimizer, meta={"step": 10})   # every rank
>>> meta = load(directory, model, optimizer)               # any DP/TP/CP layout of the same model
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dist_mha.checkpoint.atomic_io import atomic_write, fsync_dir, sha256_file
from dist_mha.checkpoint.shards import CheckpointError

SUMS = "SHA256SUMS"
RANK_STATE = "rank_state"
_EXTRA = "_extra_state"
_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod)\.")
_PER_RANK_STREAMS = ("attention_dropout",)


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, reading non-tensor items with `weights_only=True` instead of a full unpickle."""

    def load_bytes(self, read_item, value):
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def layout_key(model) -> str:
    """This rank's position in the model's parameter mesh, e.g. `cp0of2_tp1of2` (`single` without one)."""
    mesh = next((m.__dict__["_dist_mha_mesh"] for m in model.modules() if "_dist_mha_mesh" in m.__dict__), None)
    if mesh is None:
        return "single"
    coord = mesh.get_coordinate()
    return "_".join(f"{n}{c}of{s}" for n, c, s in zip(mesh.mesh_dim_names, coord, mesh.shape))


def _extra_modules(model):
    """`(clean FQN, module)` of every module that keeps an `_extra_state`."""
    base = torch.nn.Module.get_extra_state
    for name, m in model.named_modules():
        if getattr(type(m), "get_extra_state", base) is not base:
            yield _WRAPPERS.sub("", name), m


def _blob(obj) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _unblob(t: torch.Tensor):
    return torch.load(io.BytesIO(t.numpy().tobytes()), weights_only=True)


def checkpoint_state(model, optimizer=None) -> dict:
    """The DCP state dict: `model` (without `_extra_state`) and `optim`, as DSD gives them.

    Raises:
        ValueError: for a model whose TP shards are plain tensors (built with process groups): DCP
            would store one rank's shard under each name and give it to every rank.
    """
    from torch.distributed.tensor import DTensor

    if any(getattr(m, "tp_size", 1) > 1 for m in model.modules()) and not any(
            isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            "This model holds its tensor-parallel shards as plain tensors (built with process groups), so DCP "
            "would save one rank's shard under each name and load it on every rank. Build it with mesh axes "
            "(tp_group=state.mesh['tp']) for DCP, or save per-rank shards with dist_mha.checkpoint.save_tp_shard.")
    sd = {"model": {k: v for k, v in get_model_state_dict(model).items() if not k.endswith(_EXTRA)}}
    if optimizer is not None:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    return sd


def write(directory, model, optimizer=None, meta=None) -> None:
    """Every rank: writes the DCP files of `model`/`optimizer`, this rank's state and `SHA256SUMS` into `directory`.

    No publishing: `directory` is the caller's partial directory (`save` does the rename).
    """
    directory = Path(directory)
    state = checkpoint_state(model, optimizer)
    extras = {name: m.get_extra_state() for name, m in _extra_modules(model)}
    state[f"{RANK_STATE}/{layout_key(model)}"] = _blob({"modules": extras, "meta": meta or {}})
    dcp.save(state, checkpoint_id=str(directory))
    _barrier()
    if _rank0():
        lines = "".join(f"{sha256_file(f)}  {f.name}\n" for f in _files(directory))
        atomic_write(directory / SUMS, lambda fh: fh.write(lines.encode()))
    _barrier()


def _files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.iterdir() if f.is_file() and (f.name == ".metadata" or f.suffix == ".distcp"))


def verify(directory, rank: int = 0, world: int = 1) -> list[str]:
    """Problems of a DCP directory against its `SHA256SUMS` (this rank's share of the files); empty: intact."""
    directory = Path(directory)
    try:
        listed = dict(reversed(line.split("  ", 1)) for line in (directory / SUMS).read_text().splitlines() if line)
    except (OSError, ValueError) as e:
        return [f"{directory / SUMS} is missing or unreadable ({e}): the checkpoint was not completely written."]
    problems = []
    present = {f.name for f in _files(directory)}
    problems += [f"{directory / n} is not listed in {SUMS}." for n in sorted(present - set(listed))]
    for i, (name, digest) in enumerate(sorted(listed.items())):
        if i % world != rank:
            continue
        f = directory / name
        if not f.is_file():
            problems.append(f"{f} is missing.")
        elif sha256_file(f) != digest:
            problems.append(f"{f} is corrupt: its sha256 does not match {SUMS} (changed or truncated on disk).")
    return problems


def _verify_all(directory: Path) -> None:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = verify(directory, rank, world)
    found = [mine]
    if dist.is_initialized():
        found = [None] * world
        dist.all_gather_object(found, mine)
    problems = [p for ps in found for p in ps]
    if problems:
        raise CheckpointError(f"DCP checkpoint {directory} failed verification: {' '.join(problems)}", directory)


def _adapt(extra: dict, module) -> dict:
    """A saved `_extra_state` of another layout position, for `module` at its own position."""
    if not isinstance(extra, dict) or "tp_size" not in extra:
        return extra
    rng = {k: v for k, v in extra.get("rng", {}).items() if k not in _PER_RANK_STREAMS}
    return {**extra, "tp_size": getattr(module, "tp_size", 1), "tp_rank": getattr(module, "tp_rank", 0), "rng": rng}


def read(directory, model, optimizer=None) -> dict:
    """Every rank: loads `directory` into `model`/`optimizer` (any layout); returns the saved `meta`. No checks."""
    directory = Path(directory)
    metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    positions = sorted(k for k in metadata if k.startswith(RANK_STATE + "/"))
    key = f"{RANK_STATE}/{layout_key(model)}"
    same = key in metadata
    if not same:  # another layout: the first position's state (replicated streams), per-rank streams restart
        first = [k for k in positions if all(c == "0" for c in re.findall(r"(\d+)of", k))]
        key = (first or positions)[0]
    state = checkpoint_state(model, optimizer)
    state[key] = torch.empty(tuple(metadata[key].size), dtype=torch.uint8)
    dcp.load(state, checkpoint_id=str(directory), planner=_WeightsOnlyLoadPlanner())
    current = {k: v for k, v in get_model_state_dict(model).items() if k.endswith(_EXTRA)}
    set_model_state_dict(model, {**state["model"], **current})
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    saved = _unblob(state[key])
    for name, m in _extra_modules(model):
        if name in saved["modules"]:
            extra = saved["modules"][name]
            m.set_extra_state(extra if same else _adapt(extra, m))
    return saved["meta"]


def load(directory, model, optimizer=None, *, verify_files: bool = True) -> dict:
    """Every rank: checks `directory` against `SHA256SUMS`, then loads it (`read`); returns the saved `meta`.

    Raises:
        CheckpointError: naming each missing, unlisted or corrupt file (on every rank).
    """
    directory = Path(directory)
    if verify_files:
        _verify_all(directory)
    return read(directory, model, optimizer)


def save(directory, model, optimizer=None, meta=None) -> Path:
    """Every rank: writes `directory` whole or not at all (a partial directory renamed into place)."""
    directory = Path(directory)
    partial = directory.with_name(f".{directory.name}.partial")
    if _rank0():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    write(partial, model, optimizer, meta)
    if _rank0():
        if directory.exists():
            shutil.rmtree(directory)
        partial.rename(directory)
        fsync_dir(directory.parent)
    _barrier()
    return directory

"""Tensor-parallel checkpoint files: one shard per TP rank, verified on load, readable at any TP degree.

Each rank writes its `state_dict()` (whose `_extra_state` entries say how
every tensor is sharded, see `dist_mha.parallel.tp.reshard`) to
`tpRRR-of-SSS.pt`, atomically (temp file, fsync, rename), next to a
`<file>.sha256` sidecar in `sha256sum` format (`cd <dir> && sha256sum -c
*.sha256` checks them by hand). Loading verifies every file it reads against
its sidecar, so a flipped bit or a truncated file is reported by name instead
of being loaded; files are read with `weights_only=True` and `mmap=True`, so a
rank touches only the pages it needs, then resharded to the reader's TP degree.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dist_mha.checkpoint.atomic_io import atomic_write, sha256_file
from dist_mha.parallel.tp.reshard import reshard_state_dicts

_NAME = "tp{rank:03d}-of-{size:03d}.pt"
_PATTERN = re.compile(r"tp(\d{3})-of-(\d{3})\.pt$")
DIGEST_SUFFIX = ".sha256"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; `path` names the file (or directory) at fault."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


def read_digest(path) -> str | None:
    """The sha256 recorded in `<path>.sha256`, or None when there is none (or it is unreadable)."""
    try:
        text = Path(str(path) + DIGEST_SUFFIX).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    return text[0] if text and re.fullmatch(r"[0-9a-f]{64}", text[0]) else None


def save_tp_shard(state_dict: dict, directory, tp_rank: int, tp_size: int) -> Path:
    """Writes this rank's shard atomically to `directory/tpRRR-of-SSS.pt`, then its `.sha256` sidecar.

    A shard without its sidecar counts as not written (a crash between the two).

    Raises:
        OSError: naming the file and what to do when the disk is full (no temporary file is left).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _NAME.format(rank=tp_rank, size=tp_size)
    digest = atomic_write(path, lambda f: torch.save(state_dict, f))
    atomic_write(Path(str(path) + DIGEST_SUFFIX), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    return path


def find_tp_shards(directory) -> dict[int, dict[int, Path]]:
    """`{tp_size: {tp_rank: path}}` of the shard files in `directory` (no checks)."""
    directory = Path(directory)
    found: dict[int, dict[int, Path]] = {}
    for f in directory.iterdir() if directory.is_dir() else []:
        m = _PATTERN.fullmatch(f.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    return found


def verify_file(path) -> None:
    """Checks a shard file against its `.sha256` sidecar.

    Raises:
        CheckpointError: naming the file, when the sidecar is missing or the bytes do not match it.
    """
    path = Path(path)
    expected = read_digest(path)
    if expected is None:
        raise CheckpointError(
            f"Checkpoint file {path} has no readable checksum ({path.name}{DIGEST_SUFFIX}): it was not completely "
            "written (a crash while saving) or comes from an older dist_mha. It cannot be verified, so it is not "
            "loaded; pass verify=False to load_tp_shard to load it anyway.", path)
    size = path.stat().st_size
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"Checkpoint file {path} is corrupt: its sha256 is {actual[:16]}..., but {path.name}{DIGEST_SUFFIX}, "
            f"written with it, says {expected[:16]}... (the file now has {size} bytes; truncated or changed on "
            "disk). Resume from an earlier checkpoint, or restore this file from a copy.", path)


def verify_tp_shards(directory) -> tuple[int, list[Path]]:
    """The complete, intact shard set in `directory`: `(tp_size, files in rank order)`.

    Raises:
        FileNotFoundError: if `directory` holds no shard files.
        CheckpointError: naming the directory or file, if the set is incomplete, if
            there are sets of several TP degrees, or if a file does not match its checksum.
    """
    directory = Path(directory)
    found = find_tp_shards(directory)
    if not found:
        raise FileNotFoundError(f"No tpRRR-of-SSS.pt shard files in {directory}.")
    if len(found) != 1:
        raise CheckpointError(
            f"{directory} holds shard sets of several TP degrees {sorted(found)}; a checkpoint directory holds "
            "exactly one set. Remove the stray files (the set you did not write last) and retry.", directory)
    size, ranks = next(iter(found.items()))
    missing = sorted(set(range(size)) - set(ranks))
    if missing:
        names = ", ".join(_NAME.format(rank=r, size=size) for r in missing)
        raise CheckpointError(f"{directory} holds an incomplete TP={size} set: {names} missing.", directory)
    files = [ranks[r] for r in range(size)]
    for f in files:
        verify_file(f)
    return size, files


def load_tp_shard(directory, tp_size: int, tp_rank: int, map_location="cpu", verify: bool = True) -> dict:
    """Reads the shards in `directory` (any TP degree) and returns this rank's state dict.

    Args:
        directory: a directory written by `save_tp_shard` from every rank of one TP group.
        tp_size, tp_rank: the TP degree and rank to reshard for.
        map_location: as in `torch.load`.
        verify: check every file against its `.sha256` sidecar before loading it
            (reads each file once more).

    Raises:
        FileNotFoundError: if the directory holds no shards.
        CheckpointError: naming the file, if the set is incomplete, mixed or corrupt.
    """
    if verify:
        size, files = verify_tp_shards(directory)
    else:
        found = find_tp_shards(directory)
        complete = [s for s, ranks in found.items() if sorted(ranks) == list(range(s))]
        if len(complete) != 1:
            raise FileNotFoundError(f"Expected one complete set of tpRRR-of-SSS.pt shards in {directory}; found "
                                    f"sets {sorted(found)} (complete: {complete}).")
        size = complete[0]
        files = [found[size][r] for r in range(size)]
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location=map_location, weights_only=True, mmap=True))
        except (RuntimeError, OSError, EOFError) as e:
            raise CheckpointError(f"Checkpoint file {f} could not be read ({e}).", f) from e
    return reshard_state_dicts(shards, tp_size, tp_rank)

"""What a run directory holds, and which of its checkpoints a run may resume from.

Layout of a checkpoint root (`checkpoints/`, `deepspeed_checkpoints/` for
DeepSpeed runs, or `dcp_checkpoints/` for `train.checkpoint_format=dcp`)::

    .step_00000020.partial/   a step being written; left only by a crash, removed at the next start
    step_00000010/            a complete step: its files, then manifest.json, written last by rank 0
    step_00000010.corrupt/    a step that failed verification, set aside (kept, never read again)
    latest                    the newest published step: a hint only

A step directory appears (by one rename) only after every rank has written
its files and rank 0 has written `manifest.json`, which records each file's
size and sha256, the step, the TP and DP degrees and the model config. So a
step directory holds exactly one shard set, and one without a valid manifest
was not written by this code.

Resuming walks the steps from the newest: the first whose files all match
its manifest wins; newer ones that do not are set aside, naming the files at
fault. The `latest` pointer is not needed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from dist_mha.checkpoint.atomic_io import atomic_write, fsync_dir, sha256_file
from dist_mha.checkpoint.shards import DIGEST_SUFFIX, CheckpointError, find_tp_shards, read_digest

MANIFEST = "manifest.json"
FORMAT = "dist_mha.step/1"
ROOTS = {"tp": "checkpoints", "deepspeed": "deepspeed_checkpoints", "dcp": "dcp_checkpoints"}
_STEP = re.compile(r"step_(\d{8})")
_TMP = re.compile(r".+\.tmp\d+")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def partial_dir(root: Path, step: int) -> Path:
    return root / f".{step_name(step)}.partial"


def steps(root: Path) -> list[tuple[int, Path]]:
    """The step directories under `root`, newest first (verified or not)."""
    out = []
    for d in root.iterdir() if root.is_dir() else []:
        m = _STEP.fullmatch(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d))
    return sorted(out, reverse=True)


def write_manifest(step_dir: Path, *, step: int, kind: str, files: dict, meta: dict) -> None:
    """Records `files` ({name: sha256 or None to compute}) with their sizes, then `meta`; written last."""
    entries = {}
    for name, digest in sorted(files.items()):
        f = step_dir / name
        entries[name] = {"bytes": f.stat().st_size, "sha256": digest or sha256_file(f)}
    body = {"format": FORMAT, "step": step, "kind": kind, "files": entries, **meta}
    atomic_write(step_dir / MANIFEST, lambda f: f.write(json.dumps(body, indent=1).encode()))


def shard_digests(step_dir: Path, tp_size: int) -> dict:
    """`{file name: sha256}` of a complete TP shard set from the shards' sidecars.

    Raises:
        CheckpointError: naming the missing shard or sidecar.
    """
    found = find_tp_shards(step_dir)
    if set(found) != {tp_size} or sorted(found[tp_size]) != list(range(tp_size)):
        raise CheckpointError(f"{step_dir}: expected one complete TP={tp_size} shard set, found "
                              f"{ {s: sorted(r) for s, r in found.items()} }.", step_dir)
    out = {}
    for f in found[tp_size].values():
        digest = read_digest(f)
        if digest is None:
            raise CheckpointError(f"{f} has no checksum sidecar {f.name}{DIGEST_SUFFIX}: it was not completely written.", f)
        out[f.name] = digest
    return out


def replaced_dir(final: Path) -> Path:
    """Where `publish` keeps the old copy of a step while it puts a new one in its place."""
    return final.with_name(f".{final.name}.replaced")


def publish(partial: Path, final: Path) -> None:
    """Moves a finished step into place, then points `latest` at it.

    A re-save of the same step first renames the old copy aside and deletes
    it only after the new one is in place, so a crash at any point leaves a
    complete copy under one of the two names (`clean` puts an old copy back
    when the new one never arrived).
    """
    old = replaced_dir(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    partial.rename(final)
    fsync_dir(final.parent)
    atomic_write(final.parent / "latest", lambda f: f.write(final.name.encode()))
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(step_dir: Path) -> dict:
    """The manifest of a step directory.

    Raises:
        CheckpointError: naming the manifest when it is missing or unreadable.
    """
    path = step_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the step was not completely written.", path) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}).", path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path} is not a dist_mha manifest ({FORMAT}).", path)
    return manifest


def verify_step(step_dir: Path) -> list[str]:
    """Every problem of a step directory, each naming its file; empty when the step is intact."""
    try:
        manifest = read_manifest(step_dir)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    listed = manifest["files"]
    for name, entry in listed.items():
        f = step_dir / name
        if not f.is_file():
            problems.append(f"{f} is missing.")
            continue
        size = f.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{f} has {size} bytes, its manifest says {entry['bytes']} (truncated or overwritten).")
            continue
        digest = sha256_file(f)
        if digest != entry["sha256"]:
            problems.append(f"{f} is corrupt: sha256 {digest[:16]}..., its manifest says {entry['sha256'][:16]}... "
                            f"(same size: bytes changed on disk).")
        elif manifest["kind"] == "tp" and read_digest(f) != digest:
            problems.append(f"{f}{DIGEST_SUFFIX} does not match {f.name}.")
    if manifest["kind"] == "tp":
        stray = [f.name for files in find_tp_shards(step_dir).values() for f in files.values() if f.name not in listed]
        if stray:
            problems.append(f"{step_dir} holds shard files its manifest does not list: {sorted(stray)}.")
    return problems


def clean(root: Path) -> list[str]:
    """Removes what a crash leaves: partial step directories and `*.tmp<pid>` files. Returns notes."""
    notes = []
    for d in sorted(root.glob(".step_*.partial")) if root.is_dir() else []:
        shutil.rmtree(d, ignore_errors=True)
        notes.append(f"removed {d}: a checkpoint that was being written when a previous run stopped")
    for old in sorted(root.glob(".step_*.replaced")) if root.is_dir() else []:
        final = old.with_name(old.name[1:-len(".replaced")])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # the re-save completed; the old copy was not yet deleted
        else:
            old.rename(final)
            notes.append(f"restored {final.name}: a re-save of that step stopped before its new copy was in place")
    for f in root.iterdir() if root.is_dir() else []:
        if f.is_file() and _TMP.fullmatch(f.name):
            f.unlink(missing_ok=True)
            notes.append(f"removed {f}: a temporary file left by a previous run")
    return notes


def find_resume(root: Path) -> tuple[Path | None, dict | None, list[str]]:
    """The newest intact step under `root`: `(step dir, manifest, notes)`, or `(None, None, notes)` when there is none.

    Steps newer than it that fail verification are set aside as `<name>.corrupt`.

    Raises:
        CheckpointError: when there are steps but none is intact, listing every
            file at fault (nothing is moved in that case).
    """
    notes, failed = [], []
    pointer = root / "latest"
    hint = pointer.read_text().strip() if pointer.is_file() else None
    for _, d in steps(root):
        problems = verify_step(d)
        if problems:
            failed.append((d, problems))
            continue
        for bad, why in failed:
            aside = bad.with_name(bad.name + ".corrupt")
            if aside.exists():
                shutil.rmtree(aside)
            bad.rename(aside)
            notes.append(f"checkpoint {bad.name} failed verification and was moved to {aside.name}: {' '.join(why)}")
        if failed:
            notes.append(f"falling back to {d.name}, the newest intact checkpoint")
        if hint != d.name:
            notes.append(f"the 'latest' pointer says {hint or 'nothing (it is missing)'}; resuming from {d.name}, "
                         "the newest intact step found by scanning")
        return d, read_manifest(d), notes
    if failed:
        listing = "\n".join(f"  {d.name}: {' '.join(p)}" for d, p in failed)
        raise CheckpointError(
            f"No intact checkpoint in {root}; every step failed verification:\n{listing}\n"
            "Nothing was changed. Restore the files from a copy, or start over in a new run dir "
            "(hydra.run.dir=...) or with train.resume=false after moving this run dir away.", root)
    return None, None, notes


def has_work(run_dir: Path) -> list[str]:
    """What a previous run left in `run_dir` that a fresh start would overwrite (empty: nothing)."""
    found = []
    for name in ROOTS.values():
        s = steps(run_dir / name)
        if s:
            found.append(f"{len(s)} checkpoint step(s) in {name}/ (newest {s[0][1].name})")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append(f"{sum(1 for ln in metrics.read_text().splitlines() if ln)} rows in metrics.jsonl")
    return found


def config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """`key: saved -> now` for every dotted key whose value differs."""
    out = []
    for k in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the run dir, {b!r} now")
    return out


__all__ = ["MANIFEST", "ROOTS", "clean", "config_diff", "find_resume", "has_work", "partial_dir", "publish",
           "read_manifest", "shard_digests", "step_name", "steps", "verify_step", "write_manifest"]

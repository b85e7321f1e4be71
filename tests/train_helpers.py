"""Runs the training entry point the way users do (subprocesses) and reads what it wrote."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
FAST = ["model=tiny", "train.steps=20", "train.ckpt_every=10", "train.log_every=5", "train.progress=false",
        "train.plot=false", "train.batch_size=16", "model.dropout=0.0", "model.attention_dropout=0.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC"))}
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(args, timeout=240, check=True, cwd=ROOT, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env(), cwd=cwd, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def train(run_dir, *overrides, timeout=240, check=True, **kwargs):
    return run([sys.executable, TRAIN, f"hydra.run.dir={run_dir}", *FAST, *overrides], timeout, check, **kwargs)


def torchrun(run_dir, nproc, *overrides, extra=(), timeout=300, check=True):
    return run([torchrun_bin(), "--standalone", f"--nproc-per-node={nproc}", *extra, TRAIN,
                f"hydra.run.dir={run_dir}", *FAST, *overrides], timeout, check)


def torchrun_bin() -> str:
    return shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


def failed(proc) -> str:
    """The output of a run that must have failed (asserts that it did)."""
    assert proc.returncode != 0, f"expected a failure, got rc 0:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def metrics(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln]


def final_weights(run_dir, step):
    """Rank 0's model and optimizer tensors of the checkpoint at `step`."""
    f = Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "tp000-of-001.pt"
    if not f.exists():
        f = sorted((Path(run_dir) / "checkpoints" / f"step_{step:08d}").glob("tp000-of-*.pt"))[0]
    sd = torch.load(f, weights_only=True)
    return {k: v for k, v in sd.items() if k.startswith(("model.", "optim.")) and isinstance(v, torch.Tensor)}


def kill_tree(pid: int) -> None:
    """SIGKILLs `pid` and every descendant (torchrun starts its workers in their own sessions)."""
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def snapshot(run_dir) -> dict:
    """`{relative path: bytes}` of every file under `run_dir`: equal snapshots mean nothing was written."""
    root = Path(run_dir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def all_weights(run_dir, step):
    """Every TP rank's model and optimizer tensors of the checkpoint at `step`, keyed by (file, name)."""
    out = {}
    for f in sorted((Path(run_dir) / "checkpoints" / f"step_{step:08d}").glob("tp*-of-*.pt")):
        sd = torch.load(f, weights_only=True)
        out.update({(f.name, k): v for k, v in sd.items() if k.startswith(("model.", "optim.")) and isinstance(v, torch.Tensor)})
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")


def sbatch(*args, env, timeout=400) -> subprocess.CompletedProcess:
    """`sbatch --wait args` returning when the job ends: its return code is 0 only for COMPLETED.

    `sbatch --wait` itself polls after 2, 8, 32, 32... s, so a 12 s job returns after 42 s;
    this polls `scontrol show job` every 0.5 s (job records stay in slurmctld for MinJobAge,
    300 s by default; the local cluster has no accounting for `sacct`).
    """
    sub = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60)
    if sub.returncode:
        return sub
    job = sub.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        state = re.search(r"\bJobState=(\S+)", out)
        if state and state.group(1) in _DONE:
            code = re.search(r"\bExitCode=(\d+):(\d+)", out)
            rc = 0 if state.group(1) == "COMPLETED" else max(1, int(code.group(1)) if code else 1)
            return subprocess.CompletedProcess(sub.args, rc, sub.stdout, f"job {job}: {out}")
        time.sleep(0.5)
    subprocess.run(["scancel", job])
    raise TimeoutError(f"SLURM job {job} did not end within {timeout} s (cancelled)")

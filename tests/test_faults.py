"""Fault injection: every way issue 13 lost or corrupted work, run for real on CPU.

Each scenario damages a run the way a crash, a disk or a user would (flipped
bytes, a truncated shard, a crash between writing shards and publishing the
step, a deleted `latest` pointer, a second run in the same directory, a
stopped rank, a full disk, a changed config) and then checks that nothing is
lost: metrics hold each step exactly once and, where the run can resume, its
final weights and Adam state equal those of an uninterrupted run, bit for
bit at an unchanged TP degree. Runs are real subprocesses (single process
and torchrun TP=2), as a user starts them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fault_tasks
import pytest

from train_helpers import (
    FAST,
    ROOT,
    TRAIN,
    all_weights,
    env,
    failed,
    free_port,
    kill_tree,
    metrics,
    run,
    same_tensors,
    snapshot,
    torchrun,
    torchrun_bin,
    train,
)

STEPS = [5, 10, 15, 20]
F64 = "train.dtype=float64"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted single-process run (checkpoints at 10 and 20): the reference, copied by each test."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(run_dir)
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_bytes(path: Path, n: int = 64) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        block = f.read(n)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    assert path.stat().st_size == size


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files and partial step directories anywhere under `run_dir`."""
    return sorted(str(p) for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial"))


def assert_each_step_once_and_equal(run_dir: Path, reference: Path) -> None:
    got, want = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in got] == STEPS
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert same_tensors(all_weights(run_dir, 20), all_weights(reference, 20))


# --- corrupt, truncated and missing checkpoints -------------------------------------------------------------


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous_step(straight, tmp_path):
    run_dir = copy_run(straight, tmp_path / "run")
    shard = run_dir / "checkpoints" / "step_00000020" / "tp000-of-001.pt"
    flip_bytes(shard)  # same size: torch.load would succeed and resume from garbage
    proc = train(run_dir)
    assert f"{shard} is corrupt" in proc.stdout
    assert "falling back to step_00000010" in proc.stdout
    assert (run_dir / "checkpoints" / "step_00000020.corrupt" / "tp000-of-001.pt").is_file()  # set aside, not deleted
    assert_each_step_once_and_equal(run_dir, straight)


def test_truncated_shard_at_tp2_falls_back_on_every_rank_in_one_run_dir(tmp_path):
    # Ranks resolve different run dirs here (as the deepspeed CLI's timestamps can): rank 0's is used by both.
    torchrun(tmp_path / "r${oc.env:RANK}", 2, "parallel.tp=2")
    run_dir = tmp_path / "r0"
    assert not (tmp_path / "r1").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_00000020").iterdir()) == [
        "manifest.json", "tp000-of-002.pt", "tp000-of-002.pt.sha256", "tp001-of-002.pt", "tp001-of-002.pt.sha256"]
    reference = copy_run(run_dir, tmp_path / "reference")
    shard = run_dir / "checkpoints" / "step_00000020" / "tp001-of-002.pt"
    truncate(shard)
    proc = torchrun(run_dir, 2, "parallel.tp=2")
    assert f"{shard} has" in proc.stdout and "truncated" in proc.stdout
    assert "falling back to step_00000010" in proc.stdout
    assert_each_step_once_and_equal(run_dir, reference)


def test_no_intact_checkpoint_stops_with_an_error_naming_every_file_and_changes_nothing(straight, tmp_path):
    run_dir = copy_run(straight, tmp_path / "run")
    flip_bytes(run_dir / "checkpoints" / "step_00000010" / "tp000-of-001.pt")
    truncate(run_dir / "checkpoints" / "step_00000020" / "tp000-of-001.pt")
    before = snapshot(run_dir)
    out = failed(train(run_dir, check=False))
    assert "No intact checkpoint" in out
    assert "step_00000010/tp000-of-001.pt is corrupt" in out and "step_00000020/tp000-of-001.pt has" in out
    assert snapshot(run_dir) == before  # no restart from scratch over the old run, nothing moved


def test_crash_mid_save_and_a_deleted_latest_pointer_resume_from_the_newest_complete_step(straight, tmp_path):
    run_dir = copy_run(straight, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    # What a crash between writing step 20's shards and publishing the step leaves: the partial directory (here
    # with a stray shard of another TP degree too), a temporary file, metrics rows of steps 15 and 20; and
    # someone deleted the `latest` pointer.
    partial = ckpts / ".step_00000020.partial"
    (ckpts / "step_00000020").rename(partial)
    (partial / "manifest.json").unlink()
    (partial / "tp001-of-002.pt").write_bytes(b"half a shard")
    (ckpts / "latest.tmp4242").write_text("step_00000020")
    (ckpts / "latest").unlink()
    proc = train(run_dir)
    assert "pointer says nothing (it is missing)" in proc.stdout and "resumed from" in proc.stdout
    assert f"removed {partial}" in proc.stdout
    assert leftovers(run_dir) == []
    assert sorted(p.name for p in (ckpts / "step_00000020").iterdir()) == [
        "manifest.json", "tp000-of-001.pt", "tp000-of-001.pt.sha256"]  # one shard set per step
    assert_each_step_once_and_equal(run_dir, straight)


def test_crash_while_saving_at_tp2_then_resume_at_tp1(tmp_path):
    straight = tmp_path / "straight"
    train(straight, F64)
    run_dir = tmp_path / "run"
    # Rank 0 dies right after writing its shard: nobody is left to publish the step or clean up.
    out = failed(torchrun(run_dir, 2, "parallel.tp=2", F64, "train.fail_at_step=20", "train.fail_mode=exit_in_save",
                          "train.fail_rank=0", check=False))
    assert "rank 0 exits after writing its step 20 shard" in out
    ckpts = run_dir / "checkpoints"
    assert (ckpts / ".step_00000020.partial" / "tp000-of-002.pt").is_file()
    assert not (ckpts / "step_00000020").exists() and (ckpts / "latest").read_text() == "step_00000010"
    train(run_dir, F64)  # TP=1 now: step 10 is resharded, the TP=2 leftovers of step 20 are removed
    assert leftovers(run_dir) == []
    assert sorted(p.name for p in (ckpts / "step_00000020").iterdir()) == [
        "manifest.json", "tp000-of-001.pt", "tp000-of-001.pt.sha256"]
    got, want = metrics(run_dir), metrics(straight)
    assert [r["step"] for r in got] == STEPS
    for a, b in zip(got, want):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)  # TP changes summation order only (float64)
    a, b = all_weights(run_dir, 20), all_weights(straight, 20)
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < 1e-9 for k in a)


# --- refused starts -----------------------------------------------------------------------------------------


def test_refused_restarts_leave_the_run_dir_untouched(straight, tmp_path):
    run_dir = copy_run(straight, tmp_path / "run")
    before = snapshot(run_dir)
    # resume=false at another TP degree used to add a second shard set next to the first.
    out = failed(torchrun(run_dir, 2, "parallel.tp=2", "train.resume=false", check=False))
    assert "train.resume=false, but run dir" in out and "already holds a run" in out
    assert out.count("already holds a run") >= 2  # rank 1 raised the same error instead of waiting for rank 0
    assert snapshot(run_dir) == before
    out = failed(train(run_dir, "model.embed_dim=64", check=False))
    assert "holds a run with another model config" in out and "model.embed_dim: 32 in the run dir, 64 now" in out
    assert "size mismatch" not in out  # refused before any tensor was loaded
    assert snapshot(run_dir) == before


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def test_a_second_run_in_the_same_run_dir_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    # The first run stops itself (SIGSTOP) at step 3, holding the run dir, so the others try while it is alive.
    first = subprocess.Popen([sys.executable, TRAIN, f"hydra.run.dir={run_dir}", *FAST, "train.fail_at_step=3",
                              "train.fail_mode=stop", "train.fail_rank=0"], env=env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while _state(first.pid) != "T":
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not reach step 3"
            time.sleep(0.1)
        holder = f"pid {first.pid} on host {socket.gethostname()}"
        for out in (failed(train(run_dir, check=False)),
                    failed(torchrun(run_dir, 2, "parallel.tp=2", check=False))):
            assert f"is in use by {holder}" in out, out[-3000:]
        assert out.count("is in use by") >= 2  # under torchrun both ranks stop with the message
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == STEPS
    assert not (run_dir / "run.lock").exists()  # released at exit


def test_stale_lock_is_taken_over_and_a_foreign_one_is_named(straight, tmp_path):
    run_dir = copy_run(straight, tmp_path / "run")
    lock = run_dir / "run.lock"
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "start_time": "1", "since": "then",
                                "command": "an old run"}))
    proc = train(run_dir)  # the run is complete: it resumes at step 20 and finishes
    assert f"took over the stale lock of pid {gone.pid}" in proc.stdout and "no longer running" in proc.stdout
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": 4242, "host": "node-that-died", "since": "then", "command": "x"}))
    out = failed(train(run_dir, check=False))
    assert "is in use by pid 4242 on host node-that-died" in out and f"delete {lock}" in out


# --- a hung peer ---------------------------------------------------------------------------------------------


def test_a_hung_rank_ends_the_job_within_the_timeout(tmp_path):
    """Rank 1 hangs at step 3; rank 0's next TP collective must time out (10 s), not wait 30 minutes.

    The peer sleeps (`fail_mode=hang`) rather than SIGSTOPs itself: rank 0 sees the
    same silent peer, and torchrun's SIGTERM then ends it at once, where a stopped
    process makes torchrun wait 30 s before its SIGKILL (`fail_mode=stop` is used by
    the run-lock test).
    """
    proc = subprocess.Popen([torchrun_bin(), "--standalone", "--nproc-per-node=2", TRAIN, f"hydra.run.dir={tmp_path}",
                             *FAST, "parallel.tp=2", "parallel.timeout_s=10", "train.fail_at_step=3",
                             "train.fail_mode=hang"], env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=300)  # generous: 10 s timeout + start-up under load
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        pytest.fail("the job was still blocked on the hung rank after 300 s")
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0
    assert "process group timeouts (s): [10.0]" in out  # every group, TP and DP included
    assert "Timed out" in out and "rank 1 stops at step 3" in out


def test_parallel_state_groups_get_the_timeout(rank_pool):
    # explicit timeout, then inherited from the pool's default group (30 s), never torch's 30-minute default
    for timeouts in rank_pool.run(fault_tasks.parallel_state_timeouts, 2, 7.0):
        assert timeouts == [7.0, 7.0, 30.0, 30.0]


# --- a full disk -----------------------------------------------------------------------------------------------


def _no_big_files():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # smaller than a checkpoint shard
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write then fails with EFBIG instead of killing


def test_a_refused_checkpoint_write_names_the_file_and_leaves_nothing_half_written(straight, tmp_path):
    run_dir = tmp_path / "run"
    out = failed(train(run_dir, check=False, preexec_fn=_no_big_files))
    assert "Could not write" in out and "tp000-of-001.pt" in out and "ulimit -f" in out
    assert "basic_ios" not in out
    assert leftovers(run_dir) == [] and not (run_dir / "checkpoints" / "step_00000010").exists()
    log = (run_dir / "train.log").read_text()
    assert "Traceback" in log and "Could not write" in log  # the error is in the run's log, not only on stderr
    train(run_dir)  # rerun with room to write: nothing was saved, so it starts over; each step logged once
    assert_each_step_once_and_equal(run_dir, straight)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"],
                           capture_output=True, check=False)
    return probe.returncode == 0


TMPFS_SCRIPT = r"""
set -u
mnt=$1; out=$2; size=$3; shift 3
mount -t tmpfs -o size=${size} tmpfs "$mnt"
"$PYTHON" "$TRAIN" hydra.run.dir="$mnt/run" "$@" > "$out/full.log" 2>&1; echo $? > "$out/full.rc"
(cd "$mnt/run" && find . > "$out/full.files")
mount -o remount,size=64m "$mnt"
"$PYTHON" "$TRAIN" hydra.run.dir="$mnt/run" "$@" > "$out/resumed.log" 2>&1; echo $? > "$out/resumed.rc"
cp -r "$mnt/run" "$out/run"
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare with user and mount namespaces to mount a small tmpfs")
def test_a_full_disk_mid_run_then_resume_after_freeing_space(straight, tmp_path):
    """A real ENOSPC: the run dir is a tmpfs with room for one checkpoint; step 20's does not fit."""
    shard = (straight / "checkpoints" / "step_00000010" / "tp000-of-001.pt").stat().st_size
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    e = env()
    e.update(PYTHON=sys.executable, TRAIN=TRAIN)
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", TMPFS_SCRIPT, "tmpfs", str(mnt),
                    str(out), f"{shard * 3 // 2 // 1024 + 64}k", *FAST], env=e, cwd=ROOT, timeout=400, check=True)
    full = (out / "full.log").read_text()
    assert (out / "full.rc").read_text().strip() != "0"
    assert "No space left on device" in full and "step_00000020.partial/tp000-of-001.pt" in full
    assert "Free some space" in full and "basic_ios" not in full
    files = (out / "full.files").read_text().split()
    assert not [f for f in files if ".tmp" in f or f.endswith(".partial")], files
    assert "./checkpoints/step_00000010/manifest.json" in files and "./checkpoints/step_00000020" not in files
    assert (out / "resumed.rc").read_text().strip() == "0", (out / "resumed.log").read_text()[-3000:]
    assert_each_step_once_and_equal(out / "run", straight)


# --- the deepspeed CLI -------------------------------------------------------------------------------------------


def test_deepspeed_cli_uses_one_run_dir_and_exits_cleanly(tmp_path):
    pytest.importorskip("deepspeed", reason="needs deepspeed (the deepspeed extra)")
    ds = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    # No hydra.run.dir: each rank resolves outputs/<timestamp> itself, as a user's run does.
    proc = run([ds, "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank", TRAIN,
                "launcher=deepspeed", "launcher.zero_stage=2", "parallel.tp=2", "parallel.timeout_s=77", *FAST],
               timeout=400, cwd=tmp_path)
    dirs = list((tmp_path / "outputs").iterdir())
    assert len(dirs) == 1, dirs
    run_dir = dirs[0]
    assert [r["step"] for r in metrics(run_dir)] == STEPS
    files = {p.name for p in (run_dir / "deepspeed_checkpoints" / "step_00000020").iterdir()}
    assert {"manifest.json", "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= files
    log = (run_dir / "train.log").read_text()
    assert "launched by deepspeed CLI, 2 processes" in log and "DeepSpeed ZeRO-2" in log
    assert "process group timeouts (s): [77.0]" in log  # DeepSpeed's groups too
    assert "terminate called" not in proc.stdout + proc.stderr

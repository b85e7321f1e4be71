"""One writer per run directory: `<run_dir>/run.lock`, held by rank 0 for the run's life.

The lock file names its holder (pid, host, process start time, launcher job
id and attempt) and is held with `flock`, so on one host a second run finds
it busy even before reading it, and the kernel releases it when the holder
dies. A lock file left behind by a dead holder is stale and taken over:

- same host, and the pid is gone (or now belongs to another process: the
  start time differs, or it is a zombie);
- an earlier attempt of the same launcher job (torchrun restart, SLURM
  requeue), on any host.

Anything else refuses the run with a message naming the holder. A holder on
another host cannot be checked from here: if it is gone, delete the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from dist_mha.train.distributed import launch_id

LOCK_NAME = "run.lock"


class RunDirBusy(RuntimeError):
    """Another run holds the run directory."""


def _start_time(pid: int) -> str | None:
    """Kernel start time of `pid` (clock ticks since boot), None if there is no such process (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    if Path("/proc/self/stat").exists():
        started = _start_time(pid)
        return started is not None and holder.get("start_time") in (None, started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _identity() -> dict:
    job = launch_id()
    attempt = [int(os.environ.get("SLURM_RESTART_COUNT") or 0),
               int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)]
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid()),
            "job": job, "attempt": attempt, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}


def describe(holder: dict) -> str:
    job = f", job {holder['job']} attempt {holder.get('attempt')}" if holder.get("job") else ""
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}{job} "
            f"(command: {holder.get('command', '?')})")


def _stale_reason(holder: dict, me: dict) -> str | None:
    """Why the recorded holder is gone, or None if it may still be running."""
    if holder.get("job") and holder.get("job") == me["job"] and list(holder.get("attempt", [])) < me["attempt"]:
        return "an earlier attempt of this job"
    if holder.get("host") == me["host"] and not _alive(holder):
        return "no longer running"
    return None


class RunLock:
    """`with RunLock(run_dir) as lock:` holds the run directory; `lock.took_over` names a stale holder, if any.

    Raises:
        RunDirBusy: naming the holder, when another live run holds the directory.
    """

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd = None
        self.took_over: str | None = None

    def acquire(self) -> RunLock:
        me = _identity()
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd, wait=True)
                os.close(fd)
                raise RunDirBusy(self._busy(holder)) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                # No flock on this filesystem: the holder's record alone decides.
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous holder removed the file between our open and flock
                os.close(fd)
                continue
            holder = self._read(fd)
            if holder:
                reason = _stale_reason(holder, me)
                if reason is None:
                    os.close(fd)
                    raise RunDirBusy(self._busy(holder))
                self.took_over = f"{describe(holder)}: {reason}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunDirBusy(f"Could not take {self.path}: it kept being replaced by other runs.")

    def _read(self, fd, wait: bool = False) -> dict:
        # A holder writes its record right after taking the lock: give it a moment.
        for _ in range(20 if wait else 1):
            raw = os.pread(fd, 65536, 0)
            try:
                return json.loads(raw.decode()) if raw.strip() else {}
            except (ValueError, UnicodeDecodeError):
                if not wait:
                    return {"pid": -1, "host": "?", "since": "?", "command": f"unreadable lock file {raw[:80]!r}"}
            time.sleep(0.1)
        return {}

    def _busy(self, holder: dict) -> str:
        who = describe(holder) if holder else "a run that has not written its record yet"
        return (f"Run dir {self.path.parent} is in use by {who}. Only one run may write to a run dir: wait for "
                f"that run to finish, or start this one in another directory (hydra.run.dir=...). If that run is "
                f"gone (e.g. its node died), delete {self.path} and retry.")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

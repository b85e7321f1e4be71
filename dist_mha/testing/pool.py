"""A persistent pool of gloo rank processes for multi-process tests.

Spawning ranks per test costs seconds each on a small machine (torch import +
rendezvous); one pool of rank processes reused across tests costs that once.
The parent hosts the TCPStore on port 0 (no port races), every process group
gets a hard timeout, TP subgroups are created once, and every worker error is
re-raised in the parent with its rank and traceback. After a failure the
pool is rebuilt, since the failing rank's peers may be stuck in a collective.

Example:

>>> pool = RankPool(world_size=2)
>>> pool.run(my_module.check, 3)   # calls check(ctx, 3) on every rank
>>> pool.close()
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


class RankError(RuntimeError):
    """A worker rank raised; the message carries its rank and traceback."""


@dataclass
class RankContext:
    """What a task function receives as its first argument on each rank.

    Attributes:
        rank, world_size: position in the pool's world.
        groups: `{tp_size: process group of this rank}` for each TP size.
        device: "cpu" or "cuda" (gloo moves CUDA tensors too).
        scratch: a dict that lives as long as the worker (for caching).
    """

    rank: int
    world_size: int
    groups: dict
    device: str
    scratch: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)

    def group(self, tp_size: int):
        return self.groups[tp_size]

    def grid(self, tp_size: int, cp_size: int):
        """`(tp_group, cp_group)` of this rank in a TP x CP layout (TP ranks contiguous)."""
        return self.grids[(tp_size, cp_size)]


def _resolve(name: str):
    module, qualname = name.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _grid_groups(rank, world, tp, cp, timeout):
    """Every rank creates every group (collective); returns this rank's (TP, CP) pair."""
    mine = [None, None]
    for start in range(0, world, tp * cp):
        for t in range(cp):
            ranks = list(range(start + t * tp, start + (t + 1) * tp))
            g = dist.new_group(ranks, timeout=timedelta(seconds=timeout))
            mine[0] = g if rank in ranks else mine[0]
        for t in range(tp):
            ranks = list(range(start + t, start + tp * cp, tp))
            g = dist.new_group(ranks, timeout=timedelta(seconds=timeout))
            mine[1] = g if rank in ranks else mine[1]
    return tuple(mine)


def _worker(rank, world, port, tp_sizes, timeout, device, conn, path, grids=()):
    sys.path[:] = path
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        groups = {}
        for tp in tp_sizes:
            for start in range(0, world, tp):
                ranks = list(range(start, start + tp))
                g = dist.new_group(ranks, timeout=timedelta(seconds=timeout))
                if rank in ranks:
                    groups[tp] = g
        ctx = RankContext(rank, world, groups, device)
        for tp, cp in grids:
            ctx.grids[(tp, cp)] = _grid_groups(rank, world, tp, cp, timeout)
        conn.send(("ready", None))
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        name, args, kwargs = msg
        try:
            conn.send(("ok", _resolve(name)(ctx, *args, **kwargs)))
        except BaseException:
            conn.send(("err", traceback.format_exc()))
            break  # leave: peers blocked on us fail fast on the closed connection
    dist.destroy_process_group()


class RankPool:
    """`world_size` worker processes joined in one gloo world, reused across tasks.

    Args:
        world_size: number of rank processes.
        tp_sizes: TP group sizes to create (each must divide `world_size`);
            TP ranks are contiguous.
        timeout: seconds for rendezvous and for every collective.
        device: "cpu" or "cuda" for `RankContext.device`.
        grids: `(tp, cp)` pairs (tp * cp divides `world_size`) for which TP x
            CP groups are created (`RankContext.grid(tp, cp)`).
    """

    def __init__(self, world_size: int = 2, tp_sizes=None, timeout: float = 30.0, device: str = "cpu", grids=()):
        self.world_size = world_size
        self.grids = tuple(tuple(g) for g in grids)
        self.tp_sizes = tuple(tp_sizes or [d for d in (1, 2, 4, 8) if world_size % d == 0 and d <= world_size])
        self.timeout = timeout
        self.device = device
        self._procs: list = []
        self._start()

    def _start(self) -> None:
        store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=self.timeout), wait_for_workers=False)
        self._store = store  # keep the server alive as long as the workers
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            for r in range(self.world_size):
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=_worker,
                    args=(r, self.world_size, store.port, self.tp_sizes, self.timeout, self.device, child, list(sys.path),
                          self.grids),
                    daemon=True,
                )
                p.start()
                self._conns.append(parent)
                self._procs.append(p)
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        self._collect(self.timeout + 60, "start-up", restart=False)

    def _collect(self, deadline_s, what, restart=True):
        deadline = time.monotonic() + deadline_s
        results: list = [None] * self.world_size
        pending = set(range(self.world_size))
        errors = {}
        while pending:
            left = deadline - time.monotonic()
            if errors:
                # Give peers a moment to report their own view, then give up on them.
                left = min(left, 5.0 if len(errors) < self.world_size else 0)
            if left <= 0:
                break
            for r in list(pending):
                if self._conns[r].poll(min(0.05, max(left, 0))):
                    try:
                        status, payload = self._conns[r].recv()
                    except EOFError:
                        status, payload = "err", f"rank {r} exited (code {self._procs[r].exitcode})"
                    pending.discard(r)
                    if status == "err":
                        errors[r] = payload
                    else:
                        results[r] = payload
                elif not self._procs[r].is_alive():
                    pending.discard(r)
                    errors[r] = f"rank {r} died (exit code {self._procs[r].exitcode})"
        if errors or pending:
            if restart:
                self._restart()
            else:
                self._shutdown()
            if errors:
                first = min(errors)
                others = "".join(f"\n--- rank {r} ---\n{errors[r]}" for r in sorted(errors) if r != first)
                raise RankError(f"{what} failed on rank {first}:\n{errors[first]}{others}")
            raise TimeoutError(f"{what}: ranks {sorted(pending)} gave no answer within {deadline_s:.0f} s")
        return results

    def run(self, fn, *args, timeout: float = 300.0, **kwargs) -> list:
        """Runs `fn(ctx, *args, **kwargs)` on every rank; returns the per-rank results.

        `fn` must be importable by module and qualified name (a module-level function).

        Raises:
            RankError: if any rank raised (with its rank and traceback).
            TimeoutError: if a rank did not answer within `timeout` seconds.
        """
        name = f"{fn.__module__}:{fn.__qualname__}"
        for conn in self._conns:
            conn.send((name, args, kwargs))
        return self._collect(timeout, name)

    def _restart(self) -> None:
        self._shutdown()
        self._start()

    def _shutdown(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        self._procs = []

    def close(self) -> None:
        self._shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

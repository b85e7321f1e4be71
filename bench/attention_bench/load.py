"""Machine load: CPU cores used by *other* processes (from /proc), and waiting for a quiet machine."""

from __future__ import annotations

import os
import time


def _proc_jiffies(stat_text):
    fields = stat_text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # utime stime cutime cstime


def _cpu_jiffies():
    """(busy jiffies of the whole machine, jiffies of this process and its live descendants).

    Descendants (e.g. RankPool workers) are ours, not "other" load.
    """
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle and iowait
    stats, parent = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    txt = f.read()
            except OSError:
                continue
            stats[int(d)] = txt
            parent[int(d)] = int(txt.rsplit(")", 1)[1].split()[1])
    mine, todo = 0, [os.getpid()]
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        mine += _proc_jiffies(stats[pid])
        todo += [c for c, pp in parent.items() if pp == pid]
    return busy, mine


class OthersLoad:
    """Average number of CPU cores used by *other* processes between start() and stop().

    Timings on a shared 2-core machine are only meaningful when this is ~0;
    every record carries it (``others_cpu_cores``).
    """

    def __init__(self):
        self.start()

    def start(self):
        self._t, (self._busy, self._mine) = time.monotonic(), _cpu_jiffies()

    def stop(self):
        busy, mine = _cpu_jiffies()
        dt = max(time.monotonic() - self._t, 1e-6)
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, ((busy - self._busy) - (mine - self._mine)) / hz / dt)


def others_busy(interval=0.5):
    load = OthersLoad()
    time.sleep(interval)
    return load.stop()


def wait_quiet(max_wait_s, threshold=0.2):
    """Waits (up to max_wait_s) until other processes use < threshold cores; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    busy = others_busy()
    while busy >= threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = others_busy()
    return busy

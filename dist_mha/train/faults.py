"""Fault injection for the tests and for rehearsing failures: `train.fail_at_step`, `fail_rank`, `fail_mode`.

Only on the first attempt (`TORCHELASTIC_RESTART_COUNT=0`), so a torchrun
restart runs through. Modes: `exit` (the process dies at the step), `stop`
(SIGSTOP: a frozen peer that holds its sockets and never answers; torchrun
waits 30 s before it SIGKILLs it), `hang` (the same peer stuck in host code,
which torchrun's SIGTERM ends), `exit_in_save` (dies right after writing its
checkpoint shard of the step, before the step is published).
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("dist_mha.train")


def inject(cfg, info, step: int, where: str):
    """Fault injection for tests (`train.fail_at_step`, `fail_rank`, `fail_mode`), first attempt only."""
    if cfg.train.fail_at_step is None or step != cfg.train.fail_at_step or info.restart != 0 \
            or info.rank != cfg.train.fail_rank:
        return None
    mode = cfg.train.get("fail_mode", "exit")
    if where == "save" and mode == "exit_in_save":
        def crash():
            log.error("fault injection: rank %d exits after writing its step %d shard", info.rank, step)
            os._exit(13)
        return crash
    if where == "step" and mode in ("exit", "stop", "hang"):
        log.error("fault injection: rank %d %s at step %d", info.rank, {"exit": "exits"}.get(mode, "stops"), step)
        for h in logging.getLogger("dist_mha").handlers:
            h.flush()
        if mode == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)  # a hung peer: alive, holding its sockets, never answering
        elif mode == "hang":
            while True:  # the same peer, but a signal still ends it
                time.sleep(3600)
        else:
            os._exit(13)
    return None

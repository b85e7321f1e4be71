"""Rank-pool tasks for tests/test_faults.py (module level, so the pool's rank processes can import them)."""

from __future__ import annotations

from datetime import timedelta

import torch


def _timeout_s(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def parallel_state_timeouts(ctx, tp, seconds):
    """Timeouts of the TP and DP groups built with an explicit timeout, then without one."""
    from dist_mha.parallel import build_parallel_state

    explicit = build_parallel_state(tp, timeout=timedelta(seconds=seconds))
    inherited = build_parallel_state(tp)
    return [_timeout_s(explicit.tp_group), _timeout_s(explicit.dp_group),
            _timeout_s(inherited.tp_group), _timeout_s(inherited.dp_group)]

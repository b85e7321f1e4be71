"""Rotary positions, QK-norm, soft-capping and sinks at every parallel layout (issue 17).

On the 4-rank gloo pool, float64: outputs, input gradients and weight
gradients (the QK-norm weights' summed over TP, the sinks' sharded with the
heads) equal one device's to < 1e-10, for TP 2 and 4 (two key/value heads:
replicated at TP 4), ring and Ulysses CP at 2 and 4, TP x CP 2 x 2, sequence
parallelism, packed documents, explicit position ids, sliding windows and
TP-invariant dropout.
"""

from __future__ import annotations

import llm_tasks
import pytest

LAYOUTS = [(2, 1, "ring", False), (4, 1, "ring", False), (2, 1, "ring", True),
           (1, 2, "ring", False), (1, 4, "ring", False), (2, 2, "ring", False),
           (1, 2, "ulysses", False), (1, 4, "ulysses", False), (2, 2, "ulysses", False)]


@pytest.mark.parametrize("tp,cp,mode,sp", LAYOUTS,
                         ids=[f"tp{t}xcp{c}-{m}" + ("-sp" if s else "") for t, c, m, s in LAYOUTS])
def test_features_equal_one_device_in_float64(rank_pool, tp, cp, mode, sp):
    names = None
    if sp:  # sequence parallelism shards the rows across TP: packed ids and positions stay global
        names = ["rope", "qk_norm", "sinks_window", "packed", "position_ids"]
    for report in rank_pool.run(llm_tasks.layouts, tp, cp, mode, sp, names, timeout=600):
        assert report and all(err < 1e-10 for err in report.values()), report

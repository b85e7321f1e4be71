"""GroupQueryAttention at TP=8: eight query heads, one per rank, with 1, 2, 4 and 8
key/value heads (replicated on 8, 4 and 2 ranks, or split). The 8-rank gloo
pool (conftest.py), started once per session (about 10 s on 2 cores)."""

from __future__ import annotations

import gqa_tasks
import pytest


@pytest.fixture(scope="module")
def pool8(rank_pool8):
    return rank_pool8


def test_gqa_tp8_matches_reference_float64_for_every_kv_head_count(pool8):
    names = ["self", "cross_separate_key", "masks", "causal_window_gate", "sp_self_causal", "no_bias_regularized"]
    for nkv in (1, 2, 4, 8):
        for report in pool8.run(gqa_tasks.gqa_parity, 8, nkv, "float64", names, timeout=600):
            assert sorted(report) == sorted(names)
            worst = max(v for e in report.values() for v in e.values())
            assert worst < 1e-12, (nkv, report)


def test_gqa_tp8_sgd_step_and_collectives(pool8):
    for nkv, replicas in ((1, 8), (2, 4), (8, 1)):
        for err in pool8.run(gqa_tasks.gqa_sgd_step, 8, nkv):
            assert err < 1e-12
        for counts in pool8.run(gqa_tasks.gqa_comm_counts, 8, nkv, True):
            assert counts["kv_replicas"] == replicas
            assert counts["forward"] == {"all_reduce": 1}
            assert counts["backward"] == {"all_reduce": 1 if replicas == 1 else 2}

"""GroupQueryAttention under tensor parallelism, against the single-device layer.

Eight query heads with 1, 2, 4 and 8 key/value heads at TP 1, 2 and 4 (the
4-rank pool; TP=8 runs in test_gqa_tp8.py): outputs, input gradients and every
weight gradient in float64 < 1e-12, self and cross attention, masks, causal,
window, gate, sequence parallelism, TP-invariant dropout; weights after an
optimizer step; the collectives per call; initialisation; checkpoints.
"""

from __future__ import annotations

import gqa_tasks
import pytest

KV_HEADS = [1, 2, 4, 8]


@pytest.mark.parametrize("nkv", KV_HEADS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gqa_tp_matches_reference_float64(rank_pool, tp, nkv):
    reports = rank_pool.run(gqa_tasks.gqa_parity, tp, nkv, "float64")
    names = [c[0] for c in gqa_tasks.gqa_cases()]
    for report in reports:
        assert sorted(report) == sorted(names)
        worst = max(v for e in report.values() for v in e.values())
        assert worst < 1e-12, report


def test_gqa_tp_matches_reference_float32(rank_pool):
    for nkv in (1, 2):
        rank_pool.run(gqa_tasks.gqa_parity, 4, nkv, "float32")  # raises beyond float32 tolerance


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_gqa_collectives_per_call(rank_pool, cross):
    # Forward: the one output all-reduce. Backward: the one input-gradient
    # all-reduce, plus one for the replicated key/value weights' gradients
    # when there are fewer key/value heads than ranks.
    for tp, nkv, replicas in [(2, 8, 1), (2, 2, 1), (2, 1, 2), (4, 4, 1), (4, 2, 2), (4, 1, 4)]:
        for counts in rank_pool.run(gqa_tasks.gqa_comm_counts, tp, nkv, cross):
            assert counts["kv_replicas"] == replicas
            assert counts["kv_local_heads"] == max(nkv // tp, 1)
            assert counts["forward"] == {"all_reduce": 1}, (tp, nkv)
            assert counts["backward"] == {"all_reduce": 1 if replicas == 1 else 2}, (tp, nkv)
            if replicas > 1:
                # The replica sum carries (units x) the local k/v kernels and biases.
                kv_numel = 2 * (12 + 1) * 3 if not cross else 2 * (12 + 1) * 3
                assert sorted(n for _, n in counts["backward_sizes"])[0] == (tp // replicas) * kv_numel


@pytest.mark.parametrize("nkv", KV_HEADS)
def test_gqa_one_sgd_step_equals_tp1(rank_pool, nkv):
    for tp in (2, 4):
        for err in rank_pool.run(gqa_tasks.gqa_sgd_step, tp, nkv):
            assert err < 1e-12


@pytest.mark.parametrize("nkv", [1, 2])
def test_gqa_replicated_kv_heads_stay_identical_under_adam(rank_pool, nkv):
    for spread in rank_pool.run(gqa_tasks.gqa_replicas_stay_equal, 4, nkv):
        assert spread == 0.0


@pytest.mark.parametrize("nkv", KV_HEADS)
def test_gqa_initialisation_is_bitwise_independent_of_tp(rank_pool, nkv):
    for tp in (2, 4):
        assert all(rank_pool.run(gqa_tasks.gqa_init_invariance, tp, nkv))


@pytest.mark.parametrize("nkv", [1, 2])
@pytest.mark.parametrize("a,b", [(1, 4), (4, 1), (2, 4), (4, 2), (1, 2)])
def test_gqa_checkpoint_reshards_replicated_kv_heads(rank_pool, tmp_path, nkv, a, b):
    for err in rank_pool.run(gqa_tasks.gqa_reshard, nkv, a, b, str(tmp_path)):
        assert err < 1e-12


def test_gqa_invalid_tp_raises_listing_valid_sizes_before_any_collective(rank_pool):
    # 6 query heads, 3 key/value heads: TP=2 splits the queries but neither
    # splits nor evenly replicates the key/value heads.
    for msg in rank_pool.run(gqa_tasks.gqa_bad_tp, 2, 6, 3):
        assert msg is not None and "num_key_value_heads=3" in msg and "Valid TP sizes: [1, 3, 6]" in msg


@pytest.mark.parametrize("nkv", [1, 2, 8])
def test_kv_cache_decoding_under_tp_matches_full_forward(rank_pool, nkv):
    for tp in (2, 4):
        for inc_err, tp_err, nbytes in rank_pool.run(gqa_tasks.decode_under_tp, tp, nkv):
            assert inc_err < 1e-5 and tp_err < 1e-5
            # Two blocks, keys and values, 3 x 16 positions, head_dim 4, float32: only this rank's heads.
            local_heads = max(nkv // tp, 1)
            assert nbytes == 2 * 2 * 3 * 16 * local_heads * 4 * 4

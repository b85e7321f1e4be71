"""Tensor parallelism against the single-device reference, in a persistent gloo pool.

Four rank processes (TP groups of 1, 2 and 4) are shared by every test here;
see `dist_mha.testing.pool`. Tolerances are those of
`dist_mha.testing.parity.TOLERANCE` (float32 1e-5, float64 1e-10, weight
gradients 10x, all relative to the compared magnitudes).
"""

from __future__ import annotations

import pytest
import torch

import tp_tasks

TP_SIZES = [1, 2, 4]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tp", TP_SIZES)
def test_tp_matches_reference_for_every_case(rank_pool, tp, dtype):
    reports = rank_pool.run(tp_tasks.parity_matrix, tp, dtype)
    names = [c[0] for c in tp_tasks.parity_cases()]
    for report in reports:
        assert sorted(report) == sorted(names)
    if dtype == "float64":
        # Same math, different summation order across ranks: far below 1e-10.
        assert max(v for r in reports for e in r.values() for v in e.values()) < 1e-12


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_tp_forward_and_backward_each_do_exactly_one_all_reduce(rank_pool, cross):
    for tp in (2, 4):
        for counts in rank_pool.run(tp_tasks.comm_counts, tp, False, False, cross):
            assert counts["forward"] == {"all_reduce": 1}
            assert counts["backward"] == {"all_reduce": 1}


def test_rank_agreement_check_costs_one_small_all_reduce(rank_pool):
    for counts in rank_pool.run(tp_tasks.comm_counts, 2, False, True, True):
        assert counts["forward"] == {"all_reduce": 2}
        sizes = sorted(n for _, n in counts["forward_sizes"])
        assert sizes[0] <= 128 and sizes[1] == 2 * 8 * 12  # the check (< 1 KiB of int64), then the (B, T, E) output


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_sequence_parallel_gathers_inputs_and_reduce_scatters_output(rank_pool, cross):
    gather = "all_gather_single" if hasattr(torch.distributed, "all_gather_single") else "all_gather_into_tensor"
    scatter = "reduce_scatter_single" if hasattr(torch.distributed, "reduce_scatter_single") else "reduce_scatter_tensor"
    inputs = 2 if cross else 1
    for counts in rank_pool.run(tp_tasks.comm_counts, 2, True, False, cross):
        assert counts["forward"] == {gather: inputs, scatter: 1}
        # Backward: the output's all-gather, the inputs' reduce-scatters, and
        # one all-reduce summing the output-bias gradient of the rows each rank owns.
        assert counts["backward"] == {gather: 1, scatter: inputs, "all_reduce": 1}


def test_heads_not_divisible_fail_before_any_collective(rank_pool):
    messages = rank_pool.run(tp_tasks.bad_head_count, 4)
    for msg in messages:
        assert msg is not None and "num_heads=6" in msg and "[1, 2, 3, 6]" in msg


def test_ranks_with_different_shapes_get_an_error_not_a_hang(rank_pool):
    messages = rank_pool.run(tp_tasks.disagreeing_shapes, 2, timeout=60)
    for msg in messages:
        assert msg is not None and "query.shape[1]" in msg and "disagree" in msg


@pytest.mark.parametrize("kernel_init,bias_init", [
    ("glorot_uniform", "random_normal"), ("he_normal", "random_uniform"), ("truncated_normal", "ones"),
    ("lecun_uniform", "zeros"), ("orthogonal", "truncated_normal")])
def test_initialisation_is_bitwise_independent_of_tp_degree(rank_pool, kernel_init, bias_init):
    for tp in (2, 4):
        assert all(rank_pool.run(tp_tasks.init_invariance, tp, kernel_init, bias_init))


def test_one_sgd_step_at_tp2_equals_tp1(rank_pool):
    for tp in (2, 4):
        for err in rank_pool.run(tp_tasks.sgd_step, tp):
            assert err < 1e-12


@pytest.mark.parametrize("constraint", ["max_norm", "unit_norm", "min_max_norm", "non_neg", "callable"])
def test_constraints_and_losses_use_full_weights_under_tp(rank_pool, constraint):
    import tp_tasks as t

    c = t.halve_if_large if constraint == "callable" else constraint
    for w_err, loss_err in rank_pool.run(tp_tasks.constraints_and_losses, 2, c):
        assert w_err < 1e-12 and loss_err < 1e-9


def test_per_rank_dropout_streams(rank_pool):
    for tp in (2, 4):
        for r in rank_pool.run(tp_tasks.per_rank_dropout, tp):
            assert r == dict(reproducible=True, calls_differ=True, ranks_differ=True,
                             eval_heads_equal=True, replicated_equal=True)


@pytest.mark.parametrize("a,b", [(1, 2), (2, 1), (2, 4), (4, 1), (4, 2)])
def test_checkpoint_written_at_tp_a_loads_at_tp_b(rank_pool, tmp_path, a, b):
    for err, seed in rank_pool.run(tp_tasks.reshard_checkpoint, a, b, str(tmp_path)):
        assert err < 1e-12
        assert seed == 99  # the loading layer keeps its own constructor seed


def test_same_parity_on_cuda(cuda_rank_pool):
    """The test bodies above, on CUDA tensors (one GPU: gloo moves them; NCCL refuses two ranks per GPU)."""
    cuda_rank_pool.run(tp_tasks.parity_matrix, 2, "float32")
    for counts in cuda_rank_pool.run(tp_tasks.comm_counts, 2, False, False, True):
        assert counts["forward"] == {"all_reduce": 1} and counts["backward"] == {"all_reduce": 1}
    assert all(cuda_rank_pool.run(tp_tasks.init_invariance, 2, "glorot_uniform", "random_normal"))
    assert all(err < 1e-12 for err in cuda_rank_pool.run(tp_tasks.sgd_step, 2))
    for r in cuda_rank_pool.run(tp_tasks.per_rank_dropout, 2):
        assert r == dict(reproducible=True, calls_differ=True, ranks_differ=True, eval_heads_equal=True,
                         replicated_equal=True)
    for checked in cuda_rank_pool.run(tp_tasks.collective_twins, 2):
        assert len(checked) == 7


def test_region_collectives_forward_and_backward_twins(rank_pool):
    for tp in (2, 4):
        for checked in rank_pool.run(tp_tasks.collective_twins, tp):
            assert len(checked) == 7


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parallel_state_groups_are_tp_contiguous_and_mpu_matches(rank_pool, tp):
    for info in rank_pool.run(tp_tasks.parallel_state_layout, tp):
        r = info["rank"]
        assert info["tp_ranks"] == list(range(r - r % tp, r - r % tp + tp))
        assert info["dp_ranks"] == list(range(r % tp, info["world"], tp))
        assert info["mpu"] == (r % tp, tp, r // tp, info["world"] // tp, tp, 1)
        assert info["group_is_tp"]


def test_parallel_state_rejects_tp_not_dividing_world(rank_pool):
    for msg in rank_pool.run(tp_tasks.bad_parallel_state, 3):
        assert msg is not None and "tp_size=3" in msg and "[1, 2, 4]" in msg


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp_sp"])
def test_cost_model_payloads_match_bytes_counted_on_real_runs(rank_pool, sp):
    from dist_mha.parallel.cost_model import CallShape, tp_payloads

    names = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
             "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter"}
    shape = CallShape(B=tp_tasks.B, T=tp_tasks.T, S=tp_tasks.S, Dq=tp_tasks.E, Dv=10, Dk=10, O=14, N=4, H=3, Hv=5,
                      bytes_per_element=4, cross=True)
    for tp in (2, 4):
        predicted = tp_payloads(shape, tp, sp)
        for counted in rank_pool.run(tp_tasks.counted_bytes, tp, sp, True):
            for phase in ("forward", "backward"):
                got = sorted((names.get(n, n), b) for n, b in counted[phase])
                assert got == sorted(predicted[phase]), (tp, phase)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp_sp"])
def test_compile_under_tp_breaks_only_for_the_rank_check(rank_pool, sp):
    # check_ranks=False: the collectives (custom autograd Functions over
    # torch.distributed) trace into one graph. check_ranks=True reads the
    # agreement all-reduce back to Python: one data-dependent break (README).
    for graphs, breaks, reasons, same in rank_pool.run(tp_tasks.compile_graph_breaks, 2, False, sp):
        assert (graphs, breaks) == (1, 0), reasons
        assert same
    for graphs, breaks, reasons, same in rank_pool.run(tp_tasks.compile_graph_breaks, 2, True, sp):
        assert breaks == 1 and graphs == 2, reasons
        assert same


@pytest.mark.parametrize("what", ["mask_transposed", "feature_dim", "dtype"])
def test_ranks_that_disagree_on_masks_features_or_dtype_all_raise(rank_pool, what):
    messages = rank_pool.run(tp_tasks.disagreeing_call, 2, what, timeout=60)
    assert all(m is not None for m in messages), messages
    if what == "mask_transposed":
        assert all("query_mask.shape" in m for m in messages)
        assert "query_mask.shape=(2, 8)" in messages[0] and "query_mask.shape=(8, 2)" in messages[1]
    if what == "feature_dim":
        # Rank 1's own check names its input; rank 0 learns that another rank rejected its inputs.
        assert "`query`" in messages[1] and "13" in messages[1]
        assert "Another rank" in messages[0]
    if what == "dtype":
        assert all("query.dtype" in m for m in messages)
        assert any("float64" in m for m in messages) and any("float32" in m for m in messages)

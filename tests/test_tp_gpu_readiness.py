"""Tensor-parallel behaviour a GPU run depends on, checked in the gloo rank pool."""

from __future__ import annotations

import gpu_readiness_tasks as tasks


def test_eager_build_without_device_on_an_nccl_group_agrees_over_gloo(rank_pool):
    # NCCL rejects CPU tensors; the build-time draw must not be broadcast on the NCCL group itself.
    bases = rank_pool.run(tasks.eager_build_on_nccl_group, 2)
    assert bases[0] == bases[1] and bases[2] == bases[3]  # TP groups (0, 1) and (2, 3)
    assert len(set(bases)) == 2  # each group agreed on its own rank 0's draw


def test_tp_region_communicates_without_copies(rank_pool):
    for tp in (2, 4):
        for checks, errors in rank_pool.run(tasks.region_without_copies, tp):
            assert checks == {"inplace_leave": True, "inplace_enter": True}
            assert max(errors) < 1e-12


def test_rank_check_overlaps_the_local_work_and_completes_before_the_first_collective(rank_pool):
    # Without sequence parallelism the first forward collective is the output all-reduce: the check's
    # round trip runs behind the projections and the attention kernel.
    for events in rank_pool.run(tasks.rank_check_timeline, 2, False):
        assert events[:4] == ["check_start_async", "attention", "check_wait", "all_reduce"], events
    # With it, the input all-gather comes first: the check completes before it.
    for events in rank_pool.run(tasks.rank_check_timeline, 2, True):
        assert events[:4] == ["check_start_async", "check_wait", "all_gather", "attention"], events


def test_gloo_companion_of_an_nccl_group_inherits_its_timeout(rank_pool):
    # Without it the rank check's group would use torch's 30-minute default: a hung peer would block it that long.
    for companion, own in rank_pool.run(tasks.companion_timeout, 2):
        assert companion == own == 30.0

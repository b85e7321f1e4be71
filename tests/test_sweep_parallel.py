"""The correctness sweep (issue 16), multi-process defects: one test per defect, each failing before its fix.

On the shared 4-rank gloo pool (tests/conftest.py); task bodies in sweep_tasks.py.
"""

from __future__ import annotations

import sweep_tasks


def test_ring_hands_the_cuda_ops_a_contiguous_float32_lse_and_aligned_biases(rank_pool):
    # The CUDA kernels are replaced by exact CPU stand-ins that record and check their arguments
    # (what the real ops read as dense buffers); the ring, the masks and the merge are the real ones.
    # B=2 rows x n=4 heads: a strided LSE would hand every row but the first another row's LSE.
    for tile_rows in (None, 3):  # whole chunks, then query tiles of 3 rows (chunks of 4: tiles of 3 and 1)
        for errors, log in rank_pool.run(sweep_tasks.ring_private_op_handoff, tile_rows):
            # The stand-ins read the LSE they are given: with float32 LSEs the float64 results agree to ~1e-7.
            assert max(errors.values()) < 1e-5, errors
            ops = {op for op, _ in log}
            assert ops == {"cuda_flash", "cuda_flash_backward", "cuda_efficient", "cuda_efficient_backward"}, ops
            for op, tensors in log:
                if "lse" in tensors:
                    shape, dtype, contiguous, _ = tensors["lse"]
                    assert contiguous and str(dtype) == "torch.float32", (op, tensors["lse"])
            rows = {t["q"][0][2] for op, t in log if op == "cuda_efficient"}
            chunk = sweep_tasks.T // 4  # CP=2: two chunks of T/4 rows per rank
            # Only masks that vary along the queries (the packed documents) are tiled; key padding is a
            # (B, 1, 1, s) bias whatever the chunk's size.
            assert rows == ({chunk} if tile_rows is None else {3, 1, chunk}), rows


def test_weights_agree_over_tp_x_cp_whatever_each_rank_was_seeded(rank_pool):
    for equal in rank_pool.run(sweep_tasks.init_agrees_over_tp_x_cp):
        assert equal == {"layer": True, "block": True, "model": True}, equal


def test_ring_blocks_compute_the_same_inside_and_outside_autocast(rank_pool):
    for same_output, same_grad in rank_pool.run(sweep_tasks.ring_under_autocast):
        assert same_output and same_grad


def test_step_counts_never_reach_an_nccl_group_as_cpu_tensors(rank_pool):
    for scored, expected in rank_pool.run(sweep_tasks.step_batch_counts_on_an_nccl_style_dp_group):
        assert scored == expected


def test_sum_grads_counts_a_missing_gradient_as_zeros(rank_pool):
    for a, b in rank_pool.run(sweep_tasks.sum_grads_with_a_missing_gradient):
        assert a == [3.0] * 3 and b == [4.0] * 5

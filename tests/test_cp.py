"""Context parallelism (ring and Ulysses, alone and with TP) against the single-device layer.

On the 4-rank pool: TP x CP = 1x2, 1x4, 2x2 (2x4 on the 8-rank pool in
test_cp8.py). Outputs, input gradients and weight gradients summed over the
CP group equal one device's in float64 to < 1e-10, for self/cross attention,
causal, key padding, attention masks (also per head), query masks, windows,
gates, grouped K/V, rows with nothing to attend to, and TP-invariant dropout.
"""

from __future__ import annotations

import cp_tasks
import pytest

LAYOUTS = [(1, 2), (1, 4), (2, 2)]


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
@pytest.mark.parametrize("tp,cp", LAYOUTS, ids=[f"tp{t}xcp{c}" for t, c in LAYOUTS])
def test_cp_matches_reference_float64(rank_pool, tp, cp, mode):
    names = [c[0] for c in cp_tasks.cp_cases()]
    if mode == "ulysses" and tp * cp > 2:
        # 4 query heads: Ulysses needs this rank's heads (4 / tp) divisible by cp.
        names = [n for n in names if (4 // tp) % cp == 0]
    if not names:
        pytest.skip("no case has heads divisible by this layout")
    for report in rank_pool.run(cp_tasks.cp_parity, tp, cp, mode, "float64", None, names, timeout=600):
        assert sorted(report) == sorted(names)
        for name, (errors, backend) in report.items():
            assert max(errors.values()) < 1e-10, (name, errors)


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_cp_matches_reference_on_the_math_path_and_in_float32(rank_pool, mode):
    names = ["causal", "cross_causal_padded", "per_head_mask", "gqa_causal", "empty_rows"]
    for report in rank_pool.run(cp_tasks.cp_parity, 1, 2, mode, "float64", "math", names, timeout=600):
        assert all(max(e.values()) < 1e-10 for e, _ in report.values()), report
    for report in rank_pool.run(cp_tasks.cp_parity, 1, 2, mode, "float32", None, names, timeout=600):
        assert sorted(report) == sorted(names)  # float32 tolerances are checked inside


def test_ring_skips_blocks_causal_masking_empties_and_balances_work(rank_pool):
    for cp in (2, 4):
        full = rank_pool.run(cp_tasks.ring_work, cp, False)
        causal = rank_pool.run(cp_tasks.ring_work, cp, True)
        # Without a mask every rank computes all (2 x 2) blocks of each of the cp steps.
        assert all(w == (4 * cp, 0) for w in full)
        # Causal: one block of each pair of chunk pairs is empty; the balanced layout
        # gives every rank the same count: 2cp + 1 of 4cp blocks (roughly half).
        assert len(set(causal)) == 1, causal
        computed, skipped = causal[0]
        assert computed + skipped == 4 * cp and computed == 2 * cp + 1
        windowed = rank_pool.run(cp_tasks.ring_work, cp, True, 2)
        assert all(w[0] < computed for w in windowed)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_ring_point_to_point_traffic_is_pinned(rank_pool, cross):
    for cp in (2, 4):
        for counts in rank_pool.run(cp_tasks.cp_comm, 1, cp, "ring", cross):
            # No collective at all (check_ranks=False, TP=1): only ring transfers.
            assert counts["forward"] == [] and counts["backward"] == []
            # Forward: cp-1 exchanges of this rank's packed K/V block (one isend + one irecv each).
            s_local = 6 if cross else 4
            kv = 2 * cp_tasks.B * s_local * 4 * 3  # k and v: (B, s, heads, head_dim)
            assert counts["forward_p2p"] == [[("isend", kv), ("irecv", kv)]] * (cp - 1)
            # Backward: cp-1 K/V exchanges and cp exchanges of the travelling dK/dV.
            sizes = sorted(op for ex in counts["backward_p2p"] for op in ex)
            assert sizes == sorted([("isend", kv), ("irecv", kv)] * (2 * cp - 1))


def test_ulysses_collectives_are_pinned(rank_pool):
    for counts in rank_pool.run(cp_tasks.cp_comm, 1, 2, "ulysses", True):
        # Forward: one all-to-all each for q, k, v and the output; backward: their twins.
        assert [n for n, _ in counts["forward"]] == ["all_to_all_single"] * 4
        assert [n for n, _ in counts["backward"]] == ["all_to_all_single"] * 4
        assert counts["forward_p2p"] == [] and counts["backward_p2p"] == []


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_per_rank_dropout_under_cp_is_reproducible(rank_pool, mode):
    for reproducible, calls_differ in rank_pool.run(cp_tasks.dropout_per_rank, 2, mode):
        assert reproducible and calls_differ


@pytest.mark.parametrize("what,text", [
    ("ulysses_heads", "Valid CP sizes: [1, 2, 3, 6]"),
    ("mode", "cp_mode='zigzag'"),
    ("odd_length", "length is even"),
    ("scores", "return_attention_scores=True is not available under context parallelism"),
    ("forced_flash", "cannot serve ring context parallelism"),
])
def test_cp_errors_are_clear_and_raised_on_every_rank(rank_pool, what, text):
    for msg in rank_pool.run(cp_tasks.cp_errors, what, timeout=60):
        assert msg is not None and text in msg, msg


@pytest.mark.parametrize("mode,kv_heads", [("ring", 4), ("ring", 1), ("ulysses", 4), ("ulysses", 1)])
def test_cost_model_cp_payloads_match_bytes_counted_on_real_runs(rank_pool, mode, kv_heads):
    from dist_mha.parallel.cost_model import CallShape, cp_payloads

    shape = CallShape(B=cp_tasks.B, T=16, S=24, Dq=cp_tasks.E, Dv=cp_tasks.E, Dk=cp_tasks.E, O=cp_tasks.E, N=4, H=3,
                      Hv=3, bytes_per_element=4, cross=True)
    for tp, cp in ((1, 2), (1, 4), (2, 2)):
        if mode == "ulysses" and (4 // tp) % cp:
            continue
        predicted = cp_payloads(shape, cp, mode, tp, kv_heads)
        for counted in rank_pool.run(cp_tasks.cp_counted_bytes, tp, cp, mode, kv_heads):
            for phase in ("forward", "backward"):
                assert sorted(counted[phase]) == sorted(predicted[phase]), (tp, cp, phase)


def test_public_parity_harness_checks_a_tp_x_cp_layout(rank_pool):
    from dist_mha import GroupQueryAttention
    from dist_mha.testing import check_tp_parity

    report = check_tp_parity(dict(head_dim=4, num_query_heads=4, num_key_value_heads=2, sliding_window=6),
                             (2, 16, 16), call_kwargs=dict(use_causal_mask=True), tp=2, cp=2, cp_mode="ring",
                             pool=rank_pool, layer_cls=GroupQueryAttention)
    assert max(report["max_abs_error"].values()) < 1e-12 and report["backend"] == "ring"


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
@pytest.mark.parametrize("nkv", [None, 1])
def test_decoder_lm_under_tp_x_cp_matches_one_device(rank_pool, mode, nkv):
    for tp, cp in ((1, 2), (2, 2), (1, 4)):
        if mode == "ulysses" and (4 // tp) % cp:
            continue
        for logit_err, grad_err in rank_pool.run(cp_tasks.decoder_under_cp, tp, cp, mode, nkv):
            assert logit_err < 1e-10 and grad_err < 1e-10


def test_parallel_state_lays_out_dp_x_cp_x_tp(rank_pool):
    import cp_tasks as t

    for info in rank_pool.run(t.state_layout, 2, 2):
        r = info["rank"]
        assert info["tp"] == [r - r % 2, r - r % 2 + 1]
        assert info["cp"] == [r % 2, r % 2 + 2]
        assert info["dp_cp"] == [r % 2, r % 2 + 2] and info["sizes"] == (2, 2, 1)


def test_forcing_a_backend_under_ring_chooses_or_refuses_with_reasons():
    import torch

    from dist_mha.attention.kernels import blockwise

    q = torch.zeros(1, 2, 4, 8)
    assert blockwise.choose(q, q, False, "sdpa").masked == "cpu_flash"  # CPU: SDPA's flash kernel blocks
    assert blockwise.choose(q, q, True, "sdpa").masked == "math"   # dropout: math blocks (a forced sdpa then raises)
    assert blockwise.choose(q, q, False, "math").unmasked == "math"


def test_forced_varlen_under_ring_raises_on_every_rank(rank_pool):
    for msg in rank_pool.run(cp_tasks.forced_varlen_under_ring):
        assert msg is not None and "attention_backend='varlen' cannot serve ring" in msg and "varlen: its" in msg

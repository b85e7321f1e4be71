"""Context parallelism at TP2 x CP4 on the 8-rank pool (conftest.py): ring with the
4-head cases, Ulysses with 8 heads (4 per TP rank, one per CP rank; one
key/value head per TP rank is all-gathered along the sequence)."""

from __future__ import annotations

import cp_tasks
import pytest


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_tp2_cp4_matches_reference_float64(rank_pool8, mode):
    names = [c[0] for c in cp_tasks.cp_cases()]
    for report in rank_pool8.run(cp_tasks.cp_parity, 2, 4, mode, "float64", None, names, mode == "ulysses",
                                 timeout=900):
        assert sorted(report) == sorted(names)
        for name, (errors, _) in report.items():
            assert max(errors.values()) < 1e-10, (name, errors)

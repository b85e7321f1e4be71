"""Testing tools: a persistent gloo rank pool and the TP-vs-reference parity harness."""

from dist_mha.testing.parity import check_tp_parity, compare_with_reference
from dist_mha.testing.pool import RankContext, RankError, RankPool

__all__ = ["RankContext", "RankError", "RankPool", "check_tp_parity", "compare_with_reference"]

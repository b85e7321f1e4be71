"""Shared pytest setup.

Keras is only a test oracle here; it must run on its torch backend, and the
backend is chosen at import time, so the variable is set before any test
module imports keras.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest  # noqa: E402
from flash_fakes import fake_flash  # noqa: E402, F401  (fixture: stand-in flash-attn builds)


@pytest.fixture(scope="session")
def rank_pool():
    """Four gloo rank processes shared by every multi-process test (TP groups 1, 2, 4)."""
    from dist_mha.testing import RankPool

    pool = RankPool(world_size=4, tp_sizes=(1, 2, 4), timeout=30.0, grids=((1, 2), (1, 4), (2, 2)))
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def rank_pool8():
    """Eight gloo ranks for the layouts four cannot hold (TP=8; TP2 x CP4), shared across modules."""
    from dist_mha.testing import RankPool

    pool = RankPool(world_size=8, tp_sizes=(8,), timeout=60.0, grids=((2, 4),))
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def cuda_rank_pool():
    """The same on CUDA tensors (gloo: NCCL refuses two ranks on one GPU)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA, found none")
    from dist_mha.testing import RankPool

    pool = RankPool(world_size=2, tp_sizes=(1, 2), timeout=60.0, device="cuda", grids=((1, 2),))
    yield pool
    pool.close()

"""Tests for dist_mha.rng.counter: the stateless, blockwise generator."""

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_mha.rng import counter as crng
from dist_mha.rng.counter import mix64, normal, uniform

M64 = (1 << 64) - 1


def _splitmix64_reference(seed, n):
    """Sebastiano Vigna's splitmix64.c, transcribed independently."""
    out, x = [], seed & M64
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def _ks_uniform(x):
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())
    n = x.size
    return max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n))


def _ks_normal(x):
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    n = x.size
    return max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))


def test_reference_vector_of_splitmix64():
    # The published splitmix64 outputs for seed 1234567 (reference C code).
    assert _splitmix64_reference(1234567, 5) == [
        6457827717110365317, 3203168211198807973, 9817491932198370423,
        4593380528125082431, 16408922859458223821,
    ]


@pytest.mark.parametrize("key", [0, 1234567, (1 << 64) - 1, 1 << 63, mix64(5, 6)])
def test_uniform_is_top_53_bits_of_splitmix64_stream(key):
    n = 2000
    want = _splitmix64_reference(key, n)
    got = uniform(key, (n,))
    expect = torch.tensor([(w >> 11) * 2.0**-53 for w in want], dtype=torch.float64)
    expect[expect == 0] = 2.0**-54
    assert got.dtype == torch.float64
    assert torch.equal(got, expect)


def test_mix64_properties():
    assert mix64(1, 2) == mix64(1, 2)
    values = {mix64(), mix64(0), mix64(0, 0), mix64(1, 2), mix64(2, 1), mix64(1), mix64(-1),
              mix64(1 << 64), mix64(-(1 << 64)), mix64(1, 2, 3)}
    assert len(values) == 10
    assert all(0 <= v <= M64 for v in values)
    # -1 and 2**64-1 are the same 64-bit word, as documented.
    assert mix64(-1) == mix64(M64)
    assert mix64(True) == mix64(1)
    with pytest.raises(TypeError):
        mix64(1.5)
    # Avalanche: flipping one input bit flips about half the output bits.
    flips = [bin(mix64(7, 1 << b) ^ mix64(7, 0)).count("1") for b in range(64)]
    assert 24 < np.mean(flips) < 40


def test_open_interval_and_moments():
    u = uniform(mix64(3), (1 << 20,))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 3e-3
    assert abs(float(u.var()) - 1 / 12) < 1e-3
    assert _ks_uniform(u[:50000].numpy()) < 1.95 / math.sqrt(50000)
    z = normal(mix64(3), (1 << 20,))
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    assert abs(float(z.mean())) < 5e-3 and abs(float(z.std()) - 1.0) < 5e-3
    assert _ks_normal(z[:50000].numpy()) < 1.95 / math.sqrt(50000)


def test_extreme_bit_patterns_stay_inside_the_open_interval():
    # All-zero top bits (probability 2**-53) and all-one bits: the two ends.
    u = crng._to_unit(torch.tensor([0, 2047, -1], dtype=torch.int64))
    assert u.tolist() == [2.0**-54, 2.0**-54, 1.0 - 2.0**-53]


def test_different_keys_are_uncorrelated():
    a, b = normal(mix64(1, 0), (100000,)), normal(mix64(1, 1), (100000,))
    assert not torch.equal(a, b)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.02
    u, z = uniform(mix64(9), (100000,)), normal(mix64(9), (100000,))
    assert abs(float(torch.corrcoef(torch.stack([u, z]))[0, 1])) < 0.02


@pytest.mark.parametrize("fn", [uniform, normal])
@pytest.mark.parametrize(
    "shape,index",
    [
        ((10,), (slice(3, 7),)),
        ((6, 9), (slice(0, 6), slice(4, 9))),
        ((6, 9), (slice(2, 3),)),
        ((4, 5, 6), (slice(1, 3), slice(None), slice(-4, None))),
        ((4, 5, 6), (2, slice(1, 4))),
        ((3, 4, 5, 2), (slice(None), slice(1, 2), slice(0, 5), slice(1, 2))),
        ((4, 5), (slice(2, 2),)),
        ((), ()),
    ],
)
def test_block_equals_slice_of_full(fn, shape, index):
    key = mix64(11, 22)
    full = fn(key, shape)
    block = fn(key, shape, index)
    assert block.shape == full[index].shape
    assert torch.equal(block, full[index])


@pytest.mark.parametrize("fn", [uniform, normal])
def test_any_sharding_reassembles_bitwise(fn):
    key, shape = mix64(4), (64, 8, 16)
    full = fn(key, shape)
    for dim in range(3):
        for parts in (2, 4, 8):
            size = shape[dim] // parts
            shards = [
                fn(key, shape, (slice(None),) * dim + (slice(i * size, (i + 1) * size),))
                for i in range(parts)
            ]
            assert torch.equal(torch.cat(shards, dim=dim), full)


def test_element_depends_only_on_flat_index():
    # Same key, two shapes with the same element count: same flat sequence.
    key = mix64(8)
    assert torch.equal(uniform(key, (6, 4)).flatten(), uniform(key, (24,)))
    assert torch.equal(uniform(key, (3, 8))[1, 2], uniform(key, (24,))[10])


def test_invalid_index():
    with pytest.raises(ValueError, match="step 1"):
        uniform(0, (10,), (slice(0, 10, 2),))
    with pytest.raises(ValueError, match="more entries"):
        uniform(0, (10,), (slice(None), slice(None)))
    with pytest.raises(TypeError):
        uniform(0, (10,), ([1, 2],))
    with pytest.raises(IndexError):
        uniform(0, (10,), (10,))


class _CountWork(TorchDispatchMode):
    """Counts the aten ops a call dispatches and the tensor elements they produce."""

    def __init__(self):
        super().__init__()
        self.ops = self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.elements += sum(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                             if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("fn,budget", [(uniform, 32), (normal, 64)])
def test_four_million_elements_cost_a_fixed_number_of_whole_tensor_ops(fn, budget):
    # Speed itself is a benchmark (bench/bench_counter_rng.py, a ratio to torch.rand/randn in the same run);
    # here the work is counted: the op count must not grow with the element count (no per-row or per-element
    # Python loop), and the elements produced per output element stay within a budget (today 23 and 49).
    counts = {}
    for shape in ((64, 64), (2048, 2048)):
        with _CountWork() as work:
            out = fn(1, shape)
        assert out.shape == shape
        counts[shape] = (work.ops, work.elements / out.numel())
    (small_ops, _), (big_ops, per_element) = counts[(64, 64)], counts[(2048, 2048)]
    assert big_ops == small_ops, counts
    assert per_element <= budget, counts


def test_speed_benchmark_writes_ratios_to_torch(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rng.json"
    subprocess.run([sys.executable, str(root / "bench" / "bench_counter_rng.py"), "--shape", "64", "64", "--repeats", "1",
                    "--out", str(out)], check=True, capture_output=True, timeout=120)
    records = json.loads(out.read_text())["records"]
    assert [r["generator"] for r in records] == ["uniform", "normal"]
    assert all(r["elements"] == 4096 and r["ratio_to_torch"] > 0 for r in records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_bitwise():
    key, shape, index = mix64(2), (32, 48, 16), (slice(3, 30), slice(8, 40))
    for fn in (uniform, normal):
        cpu = fn(key, shape, index)
        gpu = fn(key, shape, index, device="cuda")
        assert gpu.device.type == "cuda"
        if fn is uniform:
            assert torch.equal(gpu.cpu(), cpu)
        else:  # log/cos may differ in the last ulp between libms
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)
    assert crng._srl(torch.tensor([-1], device="cuda"), 11).item() == (1 << 53) - 1

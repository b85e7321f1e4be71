"""The benchmark scripts and the GPU check: their plumbing, run here on CPU.

The GPU numbers need a GPU; what can rot unnoticed without one is checked
here: that the GPU check's test files collect on a machine without the
optional packages (the GPU image has no keras/hydra), that it refuses to run
without CUDA, that the targets are read from result files as the issue states
them, and that a benchmark run writes consistent records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "bench_attention.py"
OPTIONAL = ("keras", "hydra", "hydra_plugins", "omegaconf", "deepspeed", "submitit", "matplotlib")

# Runs pytest with the optional packages unimportable, as on the GPU image.
_BLOCKED_PYTEST = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
sys.meta_path.insert(0, Block())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def _run(args, timeout=300, extra_env=None):
    # No pytest plugins from site-packages either (hydra ships one): the GPU image has none of them.
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=str(ROOT), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.update(extra_env or {})
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_whole_suite_collects_without_optional_packages():
    proc = _run([sys.executable, "-c", _BLOCKED_PYTEST, "--collect-only", "-q", "-p", "no:cacheprovider", "tests"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.lower().split("collected")[-1], proc.stdout[-2000:]
    # The GPU check's own tests are among what collects.
    assert "tests/test_gpu.py::test_sdpa_low_precision_matches_math_on_cuda" in proc.stdout
    assert "tests/test_tp.py::test_same_parity_on_cuda" in proc.stdout


def test_gpu_check_refuses_to_run_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _run(["bash", str(ROOT / "bench" / "gpu_check.sh")], timeout=120)
    assert proc.returncode == 1
    assert "torch.cuda.is_available() is False" in proc.stderr


def _row(shape, impl, variant="self", fwdbwd=10.0, mem_ratio=None, auto="sdpa"):
    return dict(shape=shape, impl=impl, variant=variant, mode="eager", dtype="bfloat16", device="cuda",
                fwd_ms=fwdbwd / 3, fwdbwd_ms=fwdbwd, fwdbwd_tflops=1.0, auto_backend=auto,
                peak_mem_fwdbwd_ratio=mem_ratio)


def _gpu_doc(dm_ms, mha_ms, base_ms, mem_ratio):
    large = [_row("large", "dist_mha:sdpa", fwdbwd=dm_ms), _row("large", "torch_mha", fwdbwd=mha_ms),
             _row("large", "fused_baseline", fwdbwd=base_ms), _row("large", "dist_mha:math", fwdbwd=dm_ms / 2)]
    memory = [_row("memory_T16384", "dist_mha:sdpa", v, mem_ratio=mem_ratio) for v in ("self", "causal")]
    memory += [_row("memory_T16384", "fused_baseline", v, mem_ratio=1.0) for v in ("self", "causal")]
    return {"records": large}, {"records": memory}


@pytest.mark.parametrize("dm_ms,mha_ms,base_ms,mem_ratio,rc", [
    (10.0, 11.2, 10.1, 1.05, 0),   # 1.12x torch_mha, 1.01x baseline, memory 1.05x: all met
    (10.0, 10.5, 10.1, 1.05, 3),   # only 1.05x torch_mha (the issue asks >= 1.10x)
    (10.0, 11.2, 9.9, 1.05, 3),    # slower than the hand-fused baseline
    (10.0, 11.2, 10.1, 1.15, 3),   # T=16k memory 1.15x (the issue allows 1.1x)
])
def test_gpu_targets_are_read_as_the_issue_states_them(tmp_path, dm_ms, mha_ms, base_ms, mem_ratio, rc):
    large, memory = _gpu_doc(dm_ms, mha_ms, base_ms, mem_ratio)
    paths = [tmp_path / "gpu_large.json", tmp_path / "gpu_memory.json"]
    for path, doc in zip(paths, (large, memory)):
        path.write_text(json.dumps(doc))
    proc = _run([sys.executable, str(BENCH), "--device", "cuda", "--check-targets", *map(str, paths)], timeout=120)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert proc.stdout.count("[PASS]") + proc.stdout.count("[MISS]") == 4  # 2 speed + 2 memory (self, causal)


def test_gpu_targets_missing_results_do_not_pass(tmp_path):
    large, _ = _gpu_doc(10.0, 11.2, 10.1, 1.0)
    (tmp_path / "gpu_large.json").write_text(json.dumps(large))
    proc = _run([sys.executable, str(BENCH), "--device", "cuda", "--check-targets", str(tmp_path / "gpu_large.json"),
                 str(tmp_path / "gpu_memory.json")], timeout=120)
    assert proc.returncode == 3
    assert "missing" in proc.stdout and "could be evaluated" in proc.stdout


def test_cpu_benchmark_run_writes_consistent_records(tmp_path):
    out = tmp_path / "run.json"
    proc = _run([sys.executable, str(BENCH), "--shapes", "small", "--variants", "self,padded", "--impls", "dist_mha:sdpa",
                 "--no-memory", "--no-chart", "--heaviness", "heavy", "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {(r["variant"], r["impl"]): r for r in doc["records"]}
    assert set(rows) == {(v, i) for v in ("self", "padded") for i in ("dist_mha:sdpa", "fused_baseline")}
    for variant in ("self", "padded"):
        ours, base = rows[(variant, "dist_mha:sdpa")], rows[(variant, "fused_baseline")]
        assert ours["fwdbwd_ratio"] == pytest.approx(ours["fwdbwd_ms"] / base["fwdbwd_ms"])
        assert ours["fwdbwd_tflops"] == pytest.approx(3 * ours["flops_fwd"] / (ours["fwdbwd_ms"] * 1e-3) / 1e12)
        assert ours["backend_ran"] == "sdpa" and ours["auto_backend"] == "sdpa"
        # Both ran torch's fused SDPA kernel, forward and backward.
        for r in (ours, base):
            assert any("scaled_dot_product" in op and "backward" in op for op in r["attention_ops"]), r["attention_ops"]
    assert len(doc["targets"]) == 4 and all(t["target"].startswith("CPU small") for t in doc["targets"])


def test_gpu_check_dry_run_on_cpu_runs_every_step(tmp_path):
    # The script's own glue (steps, limits, result files, target step, exit codes)
    # with the CPU standing in for the GPU; timings on a busy CI core can miss
    # the targets, so exit 3 (targets missed) is accepted, a failed step is not.
    env = dict(GPU_CHECK_DRY_RUN="1", GPU_CHECK_OUT=str(tmp_path), PYTHON=sys.executable)
    proc = _run(["bash", str(ROOT / "bench" / "gpu_check.sh")], timeout=600, extra_env=env)
    assert proc.returncode in (0, 3), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in proc.stderr
    for step in ("pytest-gpu", "pytest-tp-cuda", "bench-large", "bench-memory", "bench-ragged", "bench-decode"):
        assert f"=== [{step}] rc=0" in proc.stdout, step
    for name in ("gpu_large.json", "gpu_memory.json", "gpu_targets.txt", "gpu_ragged.json", "gpu_decode.json"):
        assert (tmp_path / name).exists(), name
    verdicts = [line for line in (tmp_path / "gpu_targets.txt").read_text().splitlines() if "[PASS]" in line or "[MISS]" in line]
    assert len(verdicts) >= 8
    assert (proc.returncode == 0) == all("[PASS]" in line for line in verdicts)


def test_llm_features_bench_quick_run_writes_every_table(tmp_path):
    # In process (no second torch start-up); the bench sets one thread and patches the rotate stage for
    # --floor, both of which must be undone for the tests that follow.
    sys.path.insert(0, str(ROOT / "bench"))
    threads = torch.get_num_threads()
    try:
        import bench_llm_features

        from dist_mha.engine import stages

        rotate = stages.rotate
        doc = bench_llm_features.main(["--quick", "--floor", "--out", str(tmp_path / "llm.json")])
        assert stages.rotate is rotate
    finally:
        sys.path.remove(str(ROOT / "bench"))
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "llm.json").read_text()) == json.loads(json.dumps(doc))
    assert [(r["shape"], r["pass_"]) for r in doc["layer_calls"]] == [("small", "fwd"), ("small", "fwd+bwd")]
    for r in doc["layer_calls"] + doc["floor"]:
        extra = r.get("extras_s", r.get("floor_s"))
        # the ratio is taken from the unrounded times, the times are written rounded to 1 us
        assert r["plain_s"] > 0 and extra > 0 and abs(r["ratio"] - extra / r["plain_s"]) < 2e-3
    assert len(doc["floor"]) == 1 and {r["model"] for r in doc["decode"]} == {"plain", "rope+qk_norm"}
    assert all(r["tokens_per_s"] > 0 for r in doc["decode"])

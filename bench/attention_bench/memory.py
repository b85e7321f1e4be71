"""Peak memory of one call: CUDA allocator peaks, CPU peak RSS in a fresh worker subprocess per shape."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch

from .impls import make_impl, make_inputs
from .timing import Runner

# The CPU worker is the script itself (`bench_attention.py --mem-worker JSON`), not this module.
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench_attention.py")


def _proc_status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _can_reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_mem_cpu(runner, phase, warm=True):
    """Peak extra resident bytes of one call (see the module docstring; the caller warms up)."""
    runner.reset_grads()
    gc.collect()
    if warm:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status()["VmRSS"]
        out = getattr(runner, phase)()
        peak = _proc_status()["VmHWM"]
    else:  # no HWM reset possible: fresh process, compare ru_maxrss
        import resource

        before = _proc_status()["VmRSS"]
        out = getattr(runner, phase)()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del out
    return max(0, peak - before)


def measure_mem_cuda(runner, phase):
    runner.reset_grads()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = getattr(runner, phase)()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak - before


def mem_worker(spec_json):
    """Subprocess entry (CPU): measures the given (impl, variant) list for one shape, prints JSON."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    shape, dtype, device = spec["shape"], getattr(torch, spec["dtype"]), "cpu"
    warm = spec["warm"]
    if warm and not _can_reset_hwm():
        print(json.dumps({"error": "clear_refs not writable"}))
        return
    results = []
    for name, variant in spec["items"]:
        rec = {"impl": name, "variant": variant}
        try:
            module, call, params = make_impl(name, shape, variant, device, dtype)
            runner = Runner(name, module, call, params, make_inputs(shape, variant, device, dtype))
            if warm:  # one untimed fwd+bwd: oneDNN primitives, thread pools, lazy init
                runner.reset_grads()
                runner.fwdbwd()
            for phase in spec["phases"]:
                rec[f"peak_mem_{phase}_bytes"] = measure_mem_cpu(runner, phase, warm)
        except Exception as err:
            rec["error"] = f"{type(err).__name__}: {err}"
        results.append(rec)
        del rec
        gc.collect()
    print("MEMJSON " + json.dumps(results))


def _mem_subprocess(spec):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", KERAS_BACKEND="torch")
    proc = subprocess.run([sys.executable, SCRIPT, "--mem-worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMJSON "):
            return json.loads(line[len("MEMJSON "):])
        if line.startswith("{") and "error" in line:
            return json.loads(line)
    raise RuntimeError(f"memory worker failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


def cpu_memory(shape, items, dtype, threads):
    """{(impl, variant): {...}} for one shape; method string."""
    spec = dict(shape=shape, items=items, dtype=str(dtype).replace("torch.", ""), threads=threads, warm=True,
                phases=["fwd", "fwdbwd"])
    res = _mem_subprocess(spec)
    method = "rss_hwm_reset (fresh subprocess per shape, warm-up, MALLOC_MMAP_THRESHOLD_=65536)"
    if isinstance(res, dict):  # clear_refs unavailable: one cold process per (item, phase)
        method = "ru_maxrss delta (fresh subprocess per measurement, no warm-up)"
        res = []
        for item in items:
            merged = {"impl": item[0], "variant": item[1]}
            for phase in ("fwd", "fwdbwd"):
                for r in _mem_subprocess(dict(spec, items=[item], warm=False, phases=[phase])):
                    merged.update(r)
            res.append(merged)
    return {(r["impl"], r["variant"]): r for r in res}, method

"""Peak memory of `dropout_mode="tp_invariant"` on CPU: its keep mask alone, and a layer's fwd+bwd.

Each measurement runs in a fresh subprocess started with
`MALLOC_MMAP_THRESHOLD_=65536` (every tensor >= 64 KiB is its own mmap, so a
freed tensor leaves the resident set): one warm-up call, `gc.collect()`, the
peak-RSS watermark reset (`/proc/self/clear_refs`), then the number is
`VmHWM - VmRSS` around one call (bench/README.md, "Peak memory"). Exact to a
page; it also counts a few MiB of non-tensor memory.

    python bench/bench_dropout_masks.py                       # ~1 min on 2 cores
    PYTHONPATH=<other checkout> python bench/bench_dropout_masks.py --out old.json   # the same, other code

Writes JSON (default bench/results/dropout_masks_cpu.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_bench.memory import _proc_status  # noqa: E402  (VmRSS / VmHWM of this process)

MASK_SHAPE = (4, 32, 512, 512)  # (B, heads, T, S): 33.5M elements, a 32 MiB bool mask
LAYER = dict(B=2, T=1024, E=256, heads=8)  # probabilities (2, 8, 1024, 1024): 64 MiB in float32


def _peak(fn):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status()["VmRSS"]
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = _proc_status()["VmHWM"]
    del out
    return max(0, peak - before), seconds


def worker(case: str) -> dict:
    import torch

    torch.set_num_threads(1)
    if case == "mask":
        from dist_mha.rng.invariant import invariant_keep_mask

        heads = MASK_SHAPE[1]

        def run():
            return invariant_keep_mask(5, 0, MASK_SHAPE, (slice(None), slice(0, heads)), 0.1, "cpu")

        invariant_keep_mask(5, 0, (1, 1, 8, 8), None, 0.1, "cpu")  # warm-up
        peak, seconds = _peak(run)
        return {"case": case, "shape": MASK_SHAPE, "elements": int(torch.Size(MASK_SHAPE).numel()),
                "mask_bytes": int(torch.Size(MASK_SHAPE).numel()), "peak_extra_bytes": peak, "seconds": seconds}
    from dist_mha import MultiHeadAttention

    mode = case.split(":", 1)[1]
    B, T, E, N = LAYER["B"], LAYER["T"], LAYER["E"], LAYER["heads"]
    torch.manual_seed(0)
    layer = MultiHeadAttention(N, E // N, dropout=0.1, seed=3, query_shape=E, attention_backend="math",
                               dropout_mode=mode)
    x = torch.randn(B, T, E, requires_grad=True)
    grad = torch.randn(B, T, E)

    def run():
        layer(x, x, training=True).backward(grad)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    run()  # warm-up
    peak, seconds = _peak(run)
    return {"case": case, "layer": LAYER, "peak_extra_bytes": peak, "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "dropout_masks_cpu.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    records = []
    for case in ("mask", "layer:per_rank", "layer:tp_invariant"):
        proc = subprocess.run([sys.executable, __file__, "--worker", case], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{case} failed:\n{proc.stderr[-3000:]}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        records.append(rec)
        print(f"{case:22s} peak extra {rec['peak_extra_bytes'] / 2**20:8.1f} MiB   {rec['seconds']:.2f} s", flush=True)
    import torch

    import dist_mha

    doc = {"machine": {"torch": torch.__version__, "cpu_count": os.cpu_count(), "dist_mha": dist_mha.__file__},
           "records": records}
    by = {r["case"]: r for r in records}
    doc["tp_invariant_over_per_rank_peak"] = by["layer:tp_invariant"]["peak_extra_bytes"] / by["layer:per_rank"]["peak_extra_bytes"]
    print(f"tp_invariant / per_rank peak: {doc['tp_invariant_over_per_rank_peak']:.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()

"""Ragged batches: padded and packed rows against a full one, forward+backward of one layer.

    python bench/bench_ragged.py [--out bench/results/ragged_cpu.json] [--device cpu|cuda] [--quick]

Causal self-attention, `MultiHeadAttention(N, E/N)`; CPU float32 B=8 T=2048
E=256 N=8 (the issue's shape), CUDA bf16 B=8 T=2048 E=4096 N=32. Rows, all
measured in the same run, interleaved round by round:

- `full`: every token valid (the reference);
- `padded`: row b holds `T/2 + (b - B/2) * T/32` valid tokens, right-padded,
  `query_mask = value_mask = valid` (dist_mha's default choice: the varlen
  backend on CPU);
- `padded_dense`: the same call forced onto SDPA with a mask tensor (what
  dist_mha did before the varlen backend);
- `packed`: the same documents, two per row (rows b and B-1-b fill one row
  of T exactly), with `segment_ids`: B/2 rows, no padding.

Per row: median seconds, time relative to `full`, and valid-token TFLOP/s
(the FLOPs of projections and causal attention over each document's own
tokens, the work a perfect ragged kernel does) relative to `full`'s TFLOP/s.
Targets (issue 11): CPU padded <= 0.70x full's time and packed no slower
than padded; CUDA valid-token TFLOP/s of padded and packed >= 0.95x full's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402

from dist_mha import MultiHeadAttention  # noqa: E402


def flops(lengths, E, N):
    """Forward+backward FLOPs of causal self-attention over documents of `lengths` tokens (3x forward)."""
    H = E // N
    total = 0
    for L in lengths:
        proj = 2 * L * E * N * H * 3 + 2 * L * N * H * E
        attn = (2 * N * L * L * H * 2) // 2
        total += proj + attn
    return 3 * total


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="T=256, 2 rounds (smoke test)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    B, T, E, N = (8, 2048, 4096, 32) if cuda else (8, 2048, 256, 8)
    if args.quick:
        T, args.rounds = 256, 2
    dtype = torch.bfloat16 if cuda else torch.float32
    out_path = args.out or os.path.join(HERE, "results", f"ragged_{device.type}.json")
    lengths = [T // 2 + (b - B // 2) * (T // 32) for b in range(B)]
    valid = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b, L in enumerate(lengths):
        valid[b, :L] = True
    seg = torch.full((B // 2, T), -1, dtype=torch.long, device=device)
    for r in range(B // 2):
        a, c = lengths[r], lengths[B - 1 - r]
        seg[r, :a], seg[r, a:a + c] = 2 * r, 2 * r + 1
    torch.manual_seed(0)
    layers = {name: MultiHeadAttention(N, E // N, query_shape=E, device=device, dtype=dtype,
                                       attention_backend="sdpa" if name == "padded_dense" else None)
              for name in ("full", "padded", "padded_dense", "packed")}
    for lay in layers.values():
        lay.set_weights(layers["full"].get_weights())
    x_full = torch.randn(B, T, E, device=device, dtype=dtype, requires_grad=True)
    x_packed = torch.randn(B // 2, T, E, device=device, dtype=dtype, requires_grad=True)
    calls = {
        "full": lambda: layers["full"](x_full, x_full, use_causal_mask=True),
        "padded": lambda: layers["padded"](x_full, x_full, query_mask=valid, value_mask=valid, use_causal_mask=True),
        "padded_dense": lambda: layers["padded_dense"](x_full, x_full, query_mask=valid, value_mask=valid,
                                                       use_causal_mask=True),
        "packed": lambda: layers["packed"](x_packed, x_packed, segment_ids=seg, use_causal_mask=True),
    }
    times = {name: [] for name in calls}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for name, call in calls.items():
            _sync(device)
            t0 = time.perf_counter()
            call().float().sum().backward()
            _sync(device)
            if rnd:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    work = {"full": flops([T] * B, E, N), "padded": flops(lengths, E, N), "padded_dense": flops(lengths, E, N),
            "packed": flops(lengths, E, N)}
    full_tflops = work["full"] / med["full"] / 1e12
    records = []
    for name in calls:
        tflops = work[name] / med[name] / 1e12
        records.append(dict(row=name, seconds=med[name], all_seconds=times[name], time_vs_full=med[name] / med["full"],
                            valid_tflops=tflops, valid_tflops_vs_full=tflops / full_tflops,
                            backend=layers[name].last_backend))
    by = {r["row"]: r for r in records}
    targets = ({"padded_valid_tflops_vs_full >= 0.95": by["padded"]["valid_tflops_vs_full"] >= 0.95,
                "packed_valid_tflops_vs_full >= 0.95": by["packed"]["valid_tflops_vs_full"] >= 0.95} if cuda else
               {"padded_time_vs_full <= 0.70": by["padded"]["time_vs_full"] <= 0.70,
                "packed_time <= padded_time": by["packed"]["seconds"] <= by["padded"]["seconds"]})
    doc = {"machine": {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else platform.processor(),
                       "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "dtype": str(dtype),
                       "date": time.strftime("%Y-%m-%d %H:%M")},
           "shape": {"B": B, "T": T, "E": E, "N": N, "lengths": lengths}, "records": records, "targets": targets}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
    print("| row | backend | median s | time x full | valid-token TFLOP/s | x full |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['row']} | {r['backend']} | {r['seconds']:.3f} | {r['time_vs_full']:.2f} | "
              f"{r['valid_tflops']:.4f} | {r['valid_tflops_vs_full']:.2f} |")
    print("targets:", json.dumps(targets))
    return doc


if __name__ == "__main__":
    main()

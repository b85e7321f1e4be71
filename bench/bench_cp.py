"""Context parallelism on CPU: per-rank peak memory and time of one attention call against the CP degree.

    python bench/bench_cp.py [--out bench/results/cp_cpu.json] [--quick] [--lengths 4096 8192 16384]
                             [--masks causal padding packed]

One `MultiHeadAttention` (E=256, 8 heads of 32, causal self-attention, B=1,
float32) forward+backward on the whole sequence (CP=1) and on each rank's
part under CP=2 and CP=4 (gloo ranks on this machine, `RankPool`), for the
ring and Ulysses modes. Per rank: the peak of heap bytes in use during the
call above what was in use before it (glibc's `mallinfo2`, in-use arena plus
mmap'd blocks, read after every aten op by a dispatch mode: the CPU analogue
of CUDA's `max_memory_allocated`; resident-set sizes hide freed blocks the
allocator keeps), and its time (median of `--repeats`, measured without the
probe). Memory is the point here: attention activations per rank should
fall as 1/cp. Time on a 2-core machine with 2 or 4 rank processes sharing
the cores says little about speed-up; the JSON records it anyway.

`--masks`: "causal" alone; "padding" adds a `value_mask` that pads the
last eighth of the row (ring blocks take it as a `(B, 1, 1, s)` bias: per
rank memory must still fall as 1/cp); "packed" makes the row four documents
(`segment_ids`: the mask varies along the queries, so ring blocks are cut
into query tiles of `dist_mha.engine.context.RING_TILE_BYTES`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

E, HEADS = 256, 8


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class HeapPeak(TorchDispatchMode):
    """Records the largest heap-in-use seen after any aten op while active."""

    def __init__(self):
        super().__init__()
        self.peak = _heap_in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out


def _masks(kind, T):
    if kind == "padding":
        keep = torch.ones(1, T, dtype=torch.bool)
        keep[:, T - T // 8:] = False
        return {"value_mask": keep}
    if kind == "packed":
        return {"segment_ids": torch.arange(T)[None] * 4 // T}
    return {}


def measure(ctx, T, cp, mode, repeats, masks="causal"):
    """Runs in each rank (or in the parent for cp=1): (peak extra bytes, median seconds) of one fwd+bwd."""
    from dist_mha import MultiHeadAttention
    from dist_mha.parallel import shard_sequence

    torch.set_num_threads(1)
    group = None if cp == 1 else ctx.grid(1, cp)[1]
    torch.manual_seed(0)
    extra = {} if group is None else {"cp_group": group, "cp_mode": mode}
    layer = MultiHeadAttention(HEADS, E // HEADS, query_shape=E, check_ranks=False, **extra)
    x_full = torch.randn(1, T, E, generator=torch.Generator().manual_seed(1))
    x = (x_full if group is None else shard_sequence(x_full, group)).clone().requires_grad_()
    del x_full
    call_masks = _masks(masks, T)

    def call():
        out = layer(x, x, use_causal_mask=True, **call_masks)
        out.sum().backward()
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    call()  # warm-up: allocator, thread pools
    gc.collect()
    before = _heap_in_use()
    with HeapPeak() as probe:
        call()
    peak = probe.peak - before
    times = []
    for _ in range(repeats):
        if group is not None:
            torch.distributed.barrier(group)
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return max(0, peak), statistics.median(times), layer.last_backend


class _Single:
    def grid(self, tp, cp):  # pragma: no cover - cp=1 never asks
        raise AssertionError


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cp_cpu.json"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--masks", nargs="+", default=["causal"], choices=["causal", "padding", "packed"])
    ap.add_argument("--quick", action="store_true", help="T=512 only, one repeat (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [512], 1
    import bench_cp  # the tasks by module name, so the rank processes can import them

    from dist_mha.testing import RankPool

    records = []
    pool = RankPool(world_size=4, tp_sizes=(1,), timeout=600.0, grids=((1, 2), (1, 4)))
    try:
        for masks in args.masks:
            for T in args.lengths:
                torch.set_num_threads(1)
                peak, secs, backend = bench_cp.measure(_Single(), T, 1, "ring", args.repeats, masks)
                records.append(dict(T=T, masks=masks, cp=1, mode="none", peak_extra_bytes_per_rank=peak, seconds=secs,
                                    backend=backend))
                for mode in ("ring", "ulysses"):
                    for cp in (2, 4):
                        res = pool.run(bench_cp.measure, T, cp, mode, args.repeats, masks, timeout=1800)
                        res = res[:cp]  # ranks of the first CP group (the others ran the same call)
                        records.append(dict(T=T, masks=masks, cp=cp, mode=mode,
                                            peak_extra_bytes_per_rank=max(r[0] for r in res),
                                            per_rank_peaks=[r[0] for r in res], seconds=max(r[1] for r in res),
                                            backend=res[0][2]))
    finally:
        pool.close()
    for r in records:
        base = next(b for b in records if b["T"] == r["T"] and b["masks"] == r["masks"] and b["cp"] == 1)
        r["memory_vs_cp1"] = r["peak_extra_bytes_per_rank"] / max(base["peak_extra_bytes_per_rank"], 1)
        r["memory_x_cp"] = r["memory_vs_cp1"] * r["cp"]  # 1.0 = exactly 1/cp
    doc = {"machine": {"torch": torch.__version__, "cpu_count": os.cpu_count(), "python": platform.python_version(),
                       "date": time.strftime("%Y-%m-%d %H:%M"), "threads_per_rank": 1},
           "shape": {"B": 1, "E": E, "heads": HEADS, "causal": True, "dtype": "float32"}, "records": records}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print("| masks | T | CP | mode | peak heap MiB / rank | x CP=1 | x CP=1 times cp | s (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['masks']} | {r['T']} | {r['cp']} | {r['mode']} | {r['peak_extra_bytes_per_rank'] / 2**20:.1f} | "
              f"{r['memory_vs_cp1']:.2f} | {r['memory_x_cp']:.2f} | {r['seconds']:.2f} |")
    return doc


if __name__ == "__main__":
    main()

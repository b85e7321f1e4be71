"""Tensor-parallel cost on CPU (gloo): TP=2 vs TP=1, check_ranks, tp_invariant dropout.

    python bench/bench_tp.py [--out bench/results/tp_cpu.json] [--quick] [--wait-quiet 120 --retries 3]

The timings run in one persistent `dist_mha.testing.RankPool(world_size=2)`
(gloo, one torch thread per rank); the task functions below are module level so
the rank processes can import them (`bench/` is on their sys.path).

Measured (median of timed iterations after warm-up; a `dist.barrier` before
every iteration, outside the timed region; for TP=2 each iteration's time is the
slower rank's):

1. ``tp_scaling`` -- forward+backward of `dist_mha.MultiHeadAttention`
   (default backend, no dropout) at TP=1 (rank 0 alone, 1 thread; rank 1 idles)
   and TP=2 (both ranks, 1 thread each, each rank half the heads + one
   all-reduce forward and one backward), for a small and a medium shape.
   ``speedup = t(TP=1) / t(TP=2)`` (ideal 2.0 on 2 cores). For context the parent
   also times TP=1 with torch's default intra-op threads (both cores, one process).
2. ``check_ranks`` -- TP=2 forward (no_grad) per call with `check_ranks=True`
   vs `False` (same layer; the flag alternates every block of 10 calls so both
   settings see the same conditions; the quartiles of the per-block-pair
   differences show the spread), the isolated `dist_mha.engine.inputs.check_tp_call`
   (the tiny int64 all-reduce + `.tolist()` host sync that the flag adds), and a
   raw gloo all-reduce of the same 74 int64 as the floor, in microseconds.
3. ``dropout_mode`` -- dropout=0.1, training=True, fwd+bwd at TP=1 and TP=2:
   ``per_rank`` (default backend: SDPA with its own fused dropout),
   ``per_rank`` forced onto the math backend (same kernel as tp_invariant, so
   the difference to tp_invariant is the keep-mask generation alone), and
   ``tp_invariant`` (math backend only). Peak memory of one fwd+bwd step per
   rank is measured in a second pool started with `MALLOC_MMAP_THRESHOLD_=65536`
   (every tensor >= 64 KiB is its own mmap, freed memory leaves the RSS), as
   `VmHWM - VmRSS` after resetting the watermark (`/proc/self/clear_refs`),
   so the timing pool is not slowed down by per-allocation mmaps.

Every group also records ``others_cpu_cores``: the CPU cores other processes
used meanwhile; on a 2-core machine, numbers are only meaningful near 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_attention import _proc_status  # noqa: E402

from dist_mha import MultiHeadAttention  # noqa: E402

SHAPES = {
    "tiny": dict(B=2, T=16, E=64, N=4),
    "small": dict(B=8, T=128, E=256, N=8),
    "medium": dict(B=4, T=512, E=512, N=8),
}


# ----------------------------------------------------------------------------- helpers (all ranks)
def _peak_extra_bytes(step):
    """Extra resident bytes at the peak of `step()` (needs /proc/self/clear_refs)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _proc_status()["VmRSS"]
    step()
    return max(0, _proc_status()["VmHWM"] - before)


def _build(shape, group, **layer_kwargs):
    torch.manual_seed(0)  # same weights on every rank, and the same at every TP degree
    E, N = shape["E"], shape["N"]
    layer = MultiHeadAttention(N, E // N, query_shape=E, tp_group=group, **layer_kwargs)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape["B"], shape["T"], E, generator=g).requires_grad_(True)
    grad = torch.randn(shape["B"], shape["T"], E, generator=g) / E**0.5
    return layer, x, grad


def _fwdbwd_step(layer, x, grad, training, call_kwargs=None):
    def step():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        out = layer(x, x, training=training, **(call_kwargs or {}))
        out.backward(grad)

    return step


def _timed(step, warmup, iters, group):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group=group)
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# ----------------------------------------------------------------------------- tasks (run on every rank)
def task_fwdbwd(ctx, tp, shape_name, warmup, iters, layer_kwargs=None, training=False, measure_memory=False):
    """Times fwd+bwd at TP=`tp` (tp=1: rank 0 only). Returns per-iteration ms, backend, peak bytes."""
    if tp == 1 and ctx.rank != 0:
        return None
    group = ctx.group(tp) if tp > 1 else None
    layer, x, grad = _build(SHAPES[shape_name], group, **(layer_kwargs or {}))
    step = _fwdbwd_step(layer, x, grad, training)
    if measure_memory:
        step()  # warm-up: primitives, thread pools, RNG state
        if group is not None:
            dist.barrier(group=group)
        return {"peak_bytes": _peak_extra_bytes(step), "backend": layer.last_backend}
    times = _timed(step, warmup, iters, group if tp > 1 else None)
    return {"times_ms": times, "backend": layer.last_backend}


def task_check_ranks(ctx, shape_name, warmup, iters):
    """TP=2 forward per call with check_ranks on/off (alternating), and the bare check."""
    from dist_mha.core import inputs as dm_inputs

    group = ctx.group(2)
    layer, x, _ = _build(SHAPES[shape_name], group)
    on, off, pairs = [], [], []
    block = 10  # calls per setting before switching (the setting alternates block by block)
    with torch.no_grad():
        for _ in range(warmup):
            layer(x, x)
        for b in range(2 * max(1, iters // block)):
            flag = b % 2 == 0
            layer.check_ranks = flag
            ts = []
            for _ in range(block):
                dist.barrier(group=group)
                t0 = time.perf_counter()
                layer(x, x)
                ts.append((time.perf_counter() - t0) * 1e6)
            (on if flag else off).extend(ts)
            if flag:
                pairs.append([statistics.median(ts)])
            else:
                pairs[-1].append(statistics.median(ts))
        layer.check_ranks = True
        bare = []
        for i in range(warmup + iters):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            dm_inputs.check_tp_call(layer, x, x, x, [None, None, None, None], False, False, False)
            dt = (time.perf_counter() - t0) * 1e6
            if i >= warmup:
                bare.append(dt)
        # The floor: one gloo all-reduce of the same int64 payload, nothing else.
        payload = torch.zeros(2 * 37, dtype=torch.int64)  # 3 inputs x 10 values + 4 masks + 3 flags, x2 (max of v, -v)
        raw = []
        for i in range(warmup + iters):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=group)
            dt = (time.perf_counter() - t0) * 1e6
            if i >= warmup:
                raw.append(dt)
    return {"on_us": on, "off_us": off, "bare_us": bare, "raw_allreduce_us": raw,
            "block_deltas_us": [a - b for a, b in pairs]}


# ----------------------------------------------------------------------------- parent
def _measured(fn, args):
    """Runs fn() after waiting for a quiet machine; retries when other processes were busy.

    Returns (result, others_cpu_cores) of the quietest attempt.
    """
    import bench_attention as ba

    attempts = []
    for attempt in range(1 + args.retries):
        before = ba.wait_quiet(args.wait_quiet) if args.wait_quiet else ba.others_busy(0.3)
        load = ba.OthersLoad()
        res = fn()
        busy = max(before, load.stop())
        attempts.append((busy, res))
        if busy <= 0.2:
            break
        print(f"   (attempt {attempt + 1}: other processes used {busy:.2f} cores; "
              + ("retrying)" if attempt < args.retries else "keeping the quietest attempt)"))
    busy, res = min(attempts, key=lambda a: a[0])
    return res, busy


def _slowest_rank(results):
    """Element-wise max over ranks of per-iteration times (an iteration ends when every rank is done)."""
    lists = [r["times_ms"] for r in results if r is not None]
    return [max(v) for v in zip(*lists)]


def _stats(ms):
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "n": len(ms)}


def parent_tp1_threads(shape_name, warmup, iters):
    """TP=1 in this (parent) process with torch's default intra-op threads."""
    layer, x, grad = _build(SHAPES[shape_name], None)
    return _timed(_fwdbwd_step(layer, x, grad, False), warmup, iters, None), layer.last_backend


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tp_cpu.json"))
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each group, wait up to SECONDS until other processes use < 0.2 CPU cores")
    ap.add_argument("--retries", type=int, default=0,
                    help="re-run a group up to N more times when other processes used > 0.2 cores; keep the quietest")
    ap.add_argument("--only", choices=["tp_scaling", "check_ranks", "dropout_mode"], action="append",
                    help="run only these sections (repeatable); default: all")
    args = ap.parse_args(argv)
    run = set(args.only or ["tp_scaling", "check_ranks", "dropout_mode"])

    import bench_attention as ba
    import bench_tp as mod  # tasks must be resolved as bench_tp:<name> by the workers, not __main__

    from dist_mha.testing import RankPool

    it = {"small": (5, 30), "medium": (2, 10)}
    if args.quick:
        it = {k: (1, max(3, n // 5)) for k, (w, n) in it.items()}
    doc = {"machine": ba.machine_info("cpu", torch.float32), "command": " ".join(["python"] + sys.argv),
           "shapes": SHAPES, "tp_scaling": [], "check_ranks": [], "dropout_mode": []}
    doc["machine"]["rank_threads"] = 1
    t_start = time.perf_counter()

    pool = RankPool(world_size=2, tp_sizes=(1, 2), timeout=120.0)
    try:
        # 1. TP=2 vs TP=1
        for shape in (("small", "medium") if "tp_scaling" in run else ()):
            w, n = it[shape]
            (r1, r2, (par, backend)), others = _measured(lambda: (
                pool.run(mod.task_fwdbwd, 1, shape, w, n),
                pool.run(mod.task_fwdbwd, 2, shape, w, n),
                parent_tp1_threads(shape, w, n)), args)
            t1, t2 = _stats(r1[0]["times_ms"]), _stats(_slowest_rank(r2))
            tp1_threads = _stats(par)
            rec = dict(shape=shape, dims=SHAPES[shape], backend=r1[0]["backend"],
                       tp1_1thread=t1, tp2_1thread_per_rank=t2, tp1_parent_threads=dict(tp1_threads, threads=torch.get_num_threads()),
                       speedup_tp2_vs_tp1=t1["median_ms"] / t2["median_ms"],
                       speedup_tp2_vs_tp1_all_threads=tp1_threads["median_ms"] / t2["median_ms"],
                       others_cpu_cores=round(others, 3))
            doc["tp_scaling"].append(rec)
            print(f"[tp_scaling] {shape:6s} fwd+bwd  TP=1 (1 thread) {t1['median_ms']:8.2f} ms | TP=2 (1 thread/rank) "
                  f"{t2['median_ms']:8.2f} ms | speedup {rec['speedup_tp2_vs_tp1']:.2f}x | TP=1 with "
                  f"{torch.get_num_threads()} threads {tp1_threads['median_ms']:8.2f} ms | others {others:.2f} cores")

        # 2. check_ranks cost per call
        for shape in (("tiny", "small", "medium") if "check_ranks" in run else ()):
            w, n = ((3, 40) if shape == "medium" else (20, 200)) if not args.quick else (2, 20)
            res, others = _measured(lambda: pool.run(mod.task_check_ranks, shape, w, n), args)
            on = statistics.median([statistics.median(r["on_us"]) for r in res])
            off = statistics.median([statistics.median(r["off_us"]) for r in res])
            bare = statistics.median([statistics.median(r["bare_us"]) for r in res])
            raw = statistics.median([statistics.median(r["raw_allreduce_us"]) for r in res])
            rec = dict(shape=shape, dims=SHAPES[shape], fwd_check_on_us=on, fwd_check_off_us=off,
                       delta_us=on - off, delta_rel=(on - off) / off, bare_check_tp_call_us=bare,
                       raw_gloo_allreduce_us=raw,
                       block_delta_us_quartiles=statistics.quantiles(
                           [d for r in res for d in r["block_deltas_us"]], n=4) if len(res[0]["block_deltas_us"]) > 1 else None,
                       n_per_setting=len(res[0]["on_us"]), others_cpu_cores=round(others, 3))
            doc["check_ranks"].append(rec)
            print(f"[check_ranks] {shape:6s} TP=2 forward: on {on:8.1f} us | off {off:8.1f} us | delta {on - off:7.1f} us "
                  f"({100 * rec['delta_rel']:+.1f}%) | check_tp_call alone {bare:6.1f} us | raw gloo all_reduce {raw:6.1f} us "
                  f"| others {others:.2f} cores")

        # 3. dropout modes (times)
        modes = {
            "per_rank": dict(dropout=0.1, seed=0, dropout_mode="per_rank"),
            "per_rank_math": dict(dropout=0.1, seed=0, dropout_mode="per_rank", attention_backend="math"),
            "tp_invariant": dict(dropout=0.1, seed=0, dropout_mode="tp_invariant"),
        }
        for shape in (("small", "medium") if "dropout_mode" in run else ()):
            w, n = it[shape]
            for tp in (1, 2):
                row = dict(shape=shape, dims=SHAPES[shape], tp=tp)
                res_by_mode, others = _measured(
                    lambda: {mode: pool.run(mod.task_fwdbwd, tp, shape, w, n, kw, True) for mode, kw in modes.items()}, args)
                for mode, res in res_by_mode.items():
                    times = res[0]["times_ms"] if tp == 1 else _slowest_rank(res)
                    row[mode] = dict(_stats(times), backend=res[0]["backend"])
                row["others_cpu_cores"] = round(others, 3)
                row["tp_invariant_vs_per_rank"] = row["tp_invariant"]["median_ms"] / row["per_rank"]["median_ms"]
                row["tp_invariant_vs_per_rank_math"] = row["tp_invariant"]["median_ms"] / row["per_rank_math"]["median_ms"]
                doc["dropout_mode"].append(row)
    finally:
        pool.close()

    # 3b. dropout modes (peak memory), in a pool whose malloc returns freed tensors to the OS
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        mem_pool = RankPool(world_size=2, tp_sizes=(1, 2), timeout=120.0) if doc["dropout_mode"] else None
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    try:
        for row in doc["dropout_mode"]:
            for mode, kw in modes.items():
                res = mem_pool.run(mod.task_fwdbwd, row["tp"], row["shape"], 0, 0, kw, True, True)
                row[mode]["peak_bytes_per_rank"] = max(r["peak_bytes"] for r in res if r is not None and r["peak_bytes"] is not None) \
                    if any(r and r["peak_bytes"] is not None for r in res) else None
            pb = lambda m: row[m]["peak_bytes_per_rank"]  # noqa: E731
            row["tp_invariant_vs_per_rank_mem"] = pb("tp_invariant") / pb("per_rank") if pb("per_rank") else None
            print(f"[dropout]     {row['shape']:6s} TP={row['tp']}  " + " | ".join(
                f"{m} {row[m]['median_ms']:8.2f} ms {(row[m]['peak_bytes_per_rank'] or 0) / 2**20:7.1f} MiB ({row[m]['backend']})"
                for m in modes) + f" | tp_invariant/per_rank {row['tp_invariant_vs_per_rank']:.2f}x time, "
                f"{(row['tp_invariant_vs_per_rank_mem'] or float('nan')):.2f}x memory | others {row['others_cpu_cores']:.2f} cores")
    finally:
        if mem_pool is not None:
            mem_pool.close()

    doc["dropout_explanation"] = (
        "tp_invariant draws every dropout decision from a counter-based hash of (seed, call, global head, "
        "query, key): the math backend materialises the (B, N_local, T, S) probabilities and dist_mha hashes "
        "an int64 flat index with splitmix64 (~10 elementwise passes) and compares the top 53 bits with the rate, "
        "4M elements at a time, into a 1-byte keep mask: extra time O(B*N*T*S), extra memory the mask plus "
        "~100 MB, on top of the math path's own (B,N,T,S) scores/probs/grad. per_rank lets SDPA (or flash-attn) "
        "draw its own dropout from the rank's stream inside the kernel. At TP=2 each rank only hashes its own "
        "heads, so the cost splits with the heads.")
    doc["total_seconds"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"\nwrote {args.out} ({doc['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

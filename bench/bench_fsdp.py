"""FSDP2 against DDP for the same model at DP=2 on CPU (gloo): per-rank training-state memory and step time.

    python bench/bench_fsdp.py [--out bench/results/fsdp_cpu.json] [--quick] [--tp 1]

Two data-parallel ranks (`--tp 2`: four ranks, DP2 x TP2) in one persistent
`dist_mha.testing.RankPool`, one torch thread each, float32, AdamW. The same
`DecoderLM` (same seed, same weights) and the same batches under:

- ``ddp``: what users run without FSDP. At TP=1 torch's `DistributedDataParallel`
  over plain parameters; at TP>1 (DDP refuses DTensor parameters) the model on
  process groups with the training app's one flat gradient all-reduce.
- ``fsdp2``: the model on `state.mesh` axes (DTensor parameters) with
  `fully_shard(block, mesh=state.mesh["dp"])` per block, then on the root.

Measured:

1. ``memory``: bytes of the tensors each rank holds after a step, for
   parameters, gradients and optimizer state (Adam's moments; the scalar
   `step` is not counted): local shards of DTensors, `numel * element_size`.
   FSDP's transient all-gathered blocks (one or two blocks' parameters during
   forward and backward) are not persistent state and are reported apart as
   ``fsdp2_transient_bytes`` (the largest block's unsharded parameters x 2,
   prefetch included). Target: ``ratio <= 0.55`` (ideal 1/DP = 0.5).
2. ``step_time``: median step (forward, backward, gradient reduction,
   optimizer) of the slower rank, `dist.barrier` before each step outside the
   timed region; the two modes alternate in blocks so both see the same
   machine. ``ratio = fsdp2 / ddp`` of the medians, and per round (each
   round's two blocks ran back to back: the least disturbed comparison). On 2 shared CPU cores with gloo it says
   little about GPUs: FSDP's extra all-gathers per block are latency-bound here.

Also recorded: ``others_cpu_cores``, the cores other processes used meanwhile.
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F  # noqa: E402

MODEL = dict(vocab_size=512, max_len=128, embed_dim=256, num_heads=8, num_layers=4, mlp_ratio=4)
BATCH = 8  # rows per DP rank


def _state(ctx, tp):
    from dist_mha.parallel import build_parallel_state

    key = ("state", tp)
    if key not in ctx.scratch:
        ctx.scratch[key] = build_parallel_state(tp)
    return ctx.scratch[key]


def _model(mode, st):
    from dist_mha.models.decoder import DecoderLM

    torch.manual_seed(0)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        model = DecoderLM(**MODEL, tp_group=st.mesh["tp"], seed=1)
        for block in model.blocks:
            fully_shard(block, mesh=st.mesh["dp"])
        return fully_shard(model, mesh=st.mesh["dp"])
    model = DecoderLM(**MODEL, tp_group=st.tp_group if st.tp_size > 1 else None, seed=1)
    if st.tp_size == 1:
        return torch.nn.parallel.DistributedDataParallel(model, process_group=st.dp_group)
    return model


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(tensors):
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _step(mode, model, opt, st, step):
    g = torch.Generator().manual_seed(1000 * step + st.dp_rank)
    tokens = torch.randint(0, MODEL["vocab_size"], (BATCH, MODEL["max_len"]), generator=g)
    opt.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
    if mode == "ddp" and st.tp_size > 1:
        from dist_mha.train.batches import sum_grads

        params = [p for p in model.parameters() if p.grad is not None]
        sum_grads(params, st.dp_group)
        for p in params:
            p.grad /= st.dp_size
    opt.step()


def task_run(ctx, tp, mode, warmup, blocks, per_block):
    """Builds `mode`'s model, measures its state bytes after `warmup` steps, then times `blocks` x `per_block` steps."""
    st = _state(ctx, tp)
    model = _model(mode, st)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(warmup):
        _step(mode, model, opt, st, i)
    params = list(model.parameters())
    mem = {"params": _nbytes(params), "grads": _nbytes([p.grad for p in params if p.grad is not None]),
           "optim": _nbytes([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0])}
    mem["total"] = sum(mem.values())
    if mode == "fsdp2":
        inner = model.module if hasattr(model, "module") else model
        largest = max(_nbytes(b.parameters()) for b in inner.blocks)  # this rank's FSDP shard of a block
        mem["transient"] = 2 * largest * st.dp_size  # the all-gathered block (this rank's TP shard), two in flight
    times = []
    for b in range(blocks):
        for i in range(per_block):
            dist.barrier()
            t0 = time.perf_counter()
            _step(mode, model, opt, st, warmup + b * per_block + i)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"memory": mem, "times_ms": times}


def _blocks(values, n):
    return [values[i:i + n] for i in range(0, len(values), n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fsdp_cpu.json"))
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    ap.add_argument("--tp", type=int, default=1, help="TP degree (world = 2 * tp: DP=2)")
    args = ap.parse_args(argv)

    import bench_fsdp as mod  # tasks resolved as bench_fsdp:<name> by the workers, not __main__

    from attention_bench.load import OthersLoad
    from dist_mha.testing import RankPool

    warmup, rounds, per_block = (1, 1, 2) if args.quick else (2, 3, 4)
    world = 2 * args.tp
    pool = RankPool(world_size=world, tp_sizes=(args.tp,), timeout=300.0)
    results = {"ddp": [], "fsdp2": []}
    t_start = time.perf_counter()
    try:
        load = OthersLoad()
        for _ in range(rounds):  # alternate, so both modes see the same machine
            for mode in ("ddp", "fsdp2"):
                results[mode].append(pool.run(mod.task_run, args.tp, mode, warmup, 1, per_block, timeout=900))
        others = load.stop()
    finally:
        pool.close()
    doc = {"command": " ".join(["python"] + sys.argv), "model": MODEL, "batch_rows_per_rank": BATCH, "tp": args.tp,
           "dp": 2, "world": world, "dtype": "float32", "optimizer": "AdamW", "rank_threads": 1,
           "others_cpu_cores": round(others, 3), "seconds": round(time.perf_counter() - t_start, 1)}
    for mode, runs in results.items():
        mem = max((r["memory"] for run in runs for r in run), key=lambda m: m["total"])
        # Each step's time is the slower rank's.
        steps = [max(ts) for run in runs for ts in zip(*(r["times_ms"] for r in run))]
        doc[mode] = {"memory_bytes_per_rank": mem, "step_ms": {"median": statistics.median(steps), "all": steps}}
    doc["memory_ratio_fsdp2_vs_ddp"] = doc["fsdp2"]["memory_bytes_per_rank"]["total"] / doc["ddp"]["memory_bytes_per_rank"]["total"]
    doc["memory_target"] = {"max_ratio": 0.55, "met": doc["memory_ratio_fsdp2_vs_ddp"] <= 0.55}
    doc["step_time_ratio_fsdp2_vs_ddp"] = doc["fsdp2"]["step_ms"]["median"] / doc["ddp"]["step_ms"]["median"]
    # Each round's two blocks ran back to back, so their ratio is the least disturbed by other load.
    per_round = [statistics.median(f) / statistics.median(d) for d, f in
                 zip(*(_blocks(doc[m]["step_ms"]["all"], per_block) for m in ("ddp", "fsdp2")))]
    doc["step_time_ratio_per_round"] = per_round
    doc["step_time_ratio_paired_median"] = statistics.median(per_round)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    for mode in ("ddp", "fsdp2"):
        m = doc[mode]["memory_bytes_per_rank"]
        print(f"{mode:5s}: params {m['params'] / 2**20:6.2f} MiB, grads {m['grads'] / 2**20:6.2f} MiB, optim "
              f"{m['optim'] / 2**20:6.2f} MiB, total {m['total'] / 2**20:6.2f} MiB per rank | step "
              f"{doc[mode]['step_ms']['median']:7.1f} ms (median, slower rank)")
    print(f"memory fsdp2/ddp = {doc['memory_ratio_fsdp2_vs_ddp']:.3f} (target <= 0.55) | step time fsdp2/ddp = "
          f"{doc['step_time_ratio_fsdp2_vs_ddp']:.2f} (per round {', '.join(f'{r:.2f}' for r in per_round)}) | "
          f"others used {others:.2f} cores | wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()

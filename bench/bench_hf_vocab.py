"""Vocabulary-parallel vs replicated embedding and head at TP=2 (CPU, gloo): why `CausalLM` splits them.

    python bench/bench_hf_vocab.py [--out bench/results/hf_vocab.json] [--quick]

One training step of what the vocabulary costs a language model: embed `(B, T)`
ids, an untied head, cross-entropy over all tokens, backward, AdamW. Both settings run in
the same 2-rank `RankPool` (one thread per rank; `MALLOC_MMAP_THRESHOLD_=65536`
so freed tensors leave the resident set), alternating:

- ``split``: `VocabParallelEmbedding`/`VocabParallelHead` with V/2 rows per rank
  (one all-reduce forward for the embedding, copy-in + all-gather of the logits);
- ``replicated``: the same modules with `split=False` (V rows on every rank, no collective).

Recorded per rank: parameter bytes of the two tables, the state held between
steps (weights + Adam's moments), median step time, peak extra resident bytes
of one step (`VmHWM - VmRSS`, watermark reset first: logits, gradients), their
sum, and the largest logit difference between the two (they must agree).
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
import torch.nn.functional as F  # noqa: E402

from attention_bench.memory import _proc_status  # noqa: E402

SHAPES = {"default": dict(V=32000, E=256, B=2, T=128), "quick": dict(V=4000, E=128, B=2, T=64)}


def _peak(step):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status()["VmRSS"]
    step()
    return max(0, _proc_status()["VmHWM"] - before)


def task(ctx, shape: dict, iters: int):
    from dist_mha.parallel.tp.vocab import VocabParallelEmbedding, VocabParallelHead

    torch.set_num_threads(1)
    group = ctx.group(2)
    V, E, B, T = shape["V"], shape["E"], shape["B"], shape["T"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    built = {}
    for name, split in (("split", None), ("replicated", False)):
        emb = VocabParallelEmbedding(V, E, tp_group=group, init_base=1, salt=1, split=split)
        head = VocabParallelHead(V, E, tp_group=group, init_base=1, salt=2, split=split)
        built[name] = (emb, head, torch.optim.AdamW([emb.weight, head.weight], lr=0.0))  # lr 0: same weights

    def step(name):
        emb, head, opt = built[name]
        opt.zero_grad(set_to_none=True)
        logits = head(torch.tanh(emb(ids)))
        F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)).backward()
        opt.step()
        return logits

    a, b = step("split").detach(), step("replicated").detach()
    diff = (a - b).abs().max().item()
    del a, b
    times = {"split": [], "replicated": []}
    for i in range(2 * iters):
        name = "split" if i % 2 == 0 else "replicated"
        dist.barrier(group=group)
        t0 = time.perf_counter()
        step(name)
        times[name].append((time.perf_counter() - t0) * 1e3)
    out = {"max_logit_diff": diff}
    for name, (emb, head, opt) in built.items():
        dist.barrier(group=group)
        peak = _peak(lambda: step(name))
        params = sum(p.numel() * p.element_size() for p in (emb.weight, head.weight))
        # Held between steps: weights and Adam's two moments (gradients are freed by zero_grad).
        state = params + sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                             if isinstance(t, torch.Tensor))
        out[name] = {"param_bytes": params, "state_bytes": state, "median_ms": statistics.median(times[name]),
                     "peak_step_bytes": peak, "peak_total_bytes": state + peak}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "hf_vocab.json"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    from dist_mha.testing import RankPool

    shape = SHAPES["quick" if args.quick else "default"]
    pool = RankPool(world_size=2, tp_sizes=(2,), timeout=300.0)
    try:
        ranks = pool.run(task, shape, 3 if args.quick else args.iters, timeout=1200)
    finally:
        pool.close()
    r = ranks[0]
    result = {"shape": shape, "ranks": ranks,
              "split_over_replicated": {k: r["split"][k] / r["replicated"][k]
                                        for k in ("param_bytes", "state_bytes", "median_ms", "peak_step_bytes",
                                                  "peak_total_bytes")}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["split_over_replicated"]), "max logit diff", max(x["max_logit_diff"] for x in ranks))
    return result


if __name__ == "__main__":
    main()

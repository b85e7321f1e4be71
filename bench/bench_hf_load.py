"""Peak memory of loading a Hugging Face checkpoint with `dist_mha.models.from_hf`, per rank, at TP=2.

    python bench/bench_hf_load.py [--out bench/results/hf_load.json] [--quick]

The parent writes a Llama-shaped checkpoint of random float32 tensors
(`config.json`, several `*.safetensors` files and their index, as
`save_pretrained` shards them; no transformers needed) and a tiny one. Two
gloo rank processes (`RankPool`, one thread each, `MALLOC_MMAP_THRESHOLD_=65536`
so freed tensors leave the resident set) then measure, as `VmHWM - VmRSS`
after resetting the watermark (`/proc/self/clear_refs`):

- ``tp1``: rank 0 alone loads the whole model (TP=1), the reference;
- ``tp2``: both ranks load it at TP=2, each reading only its slices;
- ``overhead``: the same for the tiny checkpoint at TP=2 (what does not
  scale with the model: Python objects, the layers' bookkeeping).

Goal (issue 18): ``(tp2 - overhead) / full_bytes <= 0.6`` on each rank, where
``full_bytes`` is the sum of the checkpoint's tensor bytes. The resident set
counts file pages a rank reads through safetensors' memory map while the map
is open; `from_hf` reads `CHUNK_BYTES` (2 MiB) of rows at a time and closes
the file after each block, so the transient beyond the rank's own shards is
about twice that block, whatever the model's size (part of the fixed overhead;
the tiny-model ``overhead`` measures the rest).

Measured (2 quiet-ish CPU cores, default model of 159 MiB in 4 files): TP=2
peaks 0.515x and 0.524x of the full model on ranks 0 and 1; TP=1 1.01x.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from attention_bench.memory import _proc_status  # noqa: E402

SIZES = {  # Llama-shaped: 8 query heads, 4 key/value heads, untied head
    "default": dict(vocab_size=16000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8),
    "quick": dict(vocab_size=4000, hidden_size=256, intermediate_size=768, num_hidden_layers=4),
    "tiny": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1),
}


def write_checkpoint(path: str, size: dict, files: int = 4) -> int:
    """A random Llama checkpoint in `files` safetensors files plus index; returns the tensors' total bytes."""
    from safetensors.torch import save_file

    from dist_mha.models.hf import config as hf_config
    from dist_mha.models.hf import weights

    raw = {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 4, "dtype": "float32", **size}
    cfg = hf_config.parse(raw)
    E, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"heads_in": lambda r: (r.units * hd, E), "heads_out": lambda r: (E, r.units * hd),
              "rows": lambda r: (r.units, E), "cols": lambda r: (E, I), "full": lambda r: (E,)}
    g = torch.Generator().manual_seed(0)
    tensors = {r.hf: torch.randn(shapes[r.kind](r), generator=g) * 0.02 for r in weights.rules(cfg)}
    names = list(tensors)
    chunks = [names[i::files] for i in range(files)]
    where = {}
    for i, chunk in enumerate(chunks):
        fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, os.path.join(path, fname), metadata={"format": "pt"})
        where.update({n: fname for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": where}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    return total


def _peak_extra_bytes(step):
    """Extra resident bytes at the peak of `step()`, including what it returns (kept until measured)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status()["VmRSS"]
    kept = step()
    peak = max(0, _proc_status()["VmHWM"] - before)
    del kept
    gc.collect()
    return peak


def task_load(ctx, paths: dict, repeats: int):
    """On every rank: peaks of from_hf for each (name, tp) in order; TP=1 runs on rank 0 only."""
    from dist_mha.models.hf import from_hf

    torch.set_num_threads(1)
    out = {}
    from_hf(paths["tiny"])  # warm-up: lazily imported modules, allocator pools
    for name, path, tp in (("overhead", paths["tiny"], 2), ("tp2", paths["model"], 2), ("tp1", paths["model"], 1)):
        group = ctx.group(tp) if tp > 1 else None
        peaks, times = [], []
        for _ in range(repeats):
            dist.barrier()
            if tp == 1 and ctx.rank != 0:
                continue
            t0 = time.perf_counter()
            peaks.append(_peak_extra_bytes(lambda: from_hf(path, tp_group=group)))
            times.append(time.perf_counter() - t0)
        if peaks:
            out[name] = {"peak_bytes": min(peaks), "peaks": peaks, "seconds": min(times)}
    dist.barrier()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "hf_load.json"))
    parser.add_argument("--quick", action="store_true", help="a smaller model (CI plumbing check)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the rank processes
    from dist_mha.testing import RankPool

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"model": os.path.join(tmp, "model"), "tiny": os.path.join(tmp, "tiny")}
        for p in paths.values():
            os.makedirs(p)
        full = write_checkpoint(paths["model"], SIZES["quick" if args.quick else "default"])
        write_checkpoint(paths["tiny"], SIZES["tiny"], files=1)
        pool = RankPool(world_size=2, tp_sizes=(1, 2), timeout=300.0)
        try:
            ranks = pool.run(task_load, paths, args.repeats, timeout=1200)
        finally:
            pool.close()
    result = {"model": SIZES["quick" if args.quick else "default"], "full_bytes": full, "ranks": ranks}
    per_rank = []
    for r, res in enumerate(ranks):
        ratio = (res["tp2"]["peak_bytes"] - res["overhead"]["peak_bytes"]) / full
        per_rank.append({"rank": r, "tp2_peak_MiB": res["tp2"]["peak_bytes"] / 2**20,
                         "overhead_MiB": res["overhead"]["peak_bytes"] / 2**20, "ratio_to_full": ratio})
    result["tp1_peak_over_full"] = ranks[0]["tp1"]["peak_bytes"] / full
    result["per_rank"] = per_rank
    result["target"] = {"ratio_to_full_max": 0.6, "met": all(p["ratio_to_full"] <= 0.6 for p in per_rank)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"full model {full / 2**20:.1f} MiB; TP=1 peak {result['tp1_peak_over_full']:.2f}x of it")
    for p in per_rank:
        print(f"rank {p['rank']}: TP=2 peak {p['tp2_peak_MiB']:.1f} MiB, overhead {p['overhead_MiB']:.1f} MiB, "
              f"(peak - overhead) / full = {p['ratio_to_full']:.3f} (target <= 0.6)")
    return result


if __name__ == "__main__":
    main()

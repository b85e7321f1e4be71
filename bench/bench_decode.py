"""KV-cache decoding: tokens/s and cache bytes for multi-head, grouped-query and multi-query attention.

    python bench/bench_decode.py [--out bench/results/decode.json] [--device cpu|cuda] [--quick]

One `DecoderLM` shape (E=512, 8 query heads of 64, 4 layers; vocabulary 256)
with 8, 2 and 1 key/value heads (MHA, GQA, MQA). For each: a prompt of P
tokens is prefilled, then N tokens are generated one at a time with the KV
cache (`dist_mha.models.generation.generate`). Reported per model: decode
tokens/s (B*N / decode time, best of `--repeats`, the models interleaved so
machine load hits them alike), prefill time, and the cache's bytes. The same
run also times MHA decoding *without* a cache (every step re-runs the whole
prefix; only the first N/8 steps, since it is slow), the baseline the cache is
for. Ratios are against MHA with a cache, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from dist_mha.models.decoder import DecoderLM  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _decode(model, prompt, new_tokens, use_cache, device):
    """(prefill seconds, decode seconds, cache bytes): greedy, `new_tokens` steps after the prompt."""
    B = prompt.shape[0]
    _sync(device)
    t0 = time.perf_counter()
    if use_cache:
        cache = model.init_cache(B, prompt.shape[1] + new_tokens)
        logits = model(prompt, cache=cache)
    else:
        cache, seq = None, prompt
        logits = model(seq)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = logits[:, -1:].argmax(-1)
        if use_cache:
            logits = model(nxt, cache=cache)
        else:
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(seq)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, (cache.nbytes if cache is not None else 0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "decode.json"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="smaller shape and fewer repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        B, P, N, E, H, L, repeats = 2, 16, 8, 64, 8, 2, 1
    else:
        B, P, N, E, H, L, repeats = 8, 128, 128, 512, 8, 4, args.repeats
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    models = {}
    for name, nkv in (("mha", H), ("gqa", 2), ("mqa", 1)):
        torch.manual_seed(0)
        models[name] = DecoderLM(256, P + N, E, H, L, num_kv_heads=nkv, device=device, dtype=dtype).eval()
    prompt = torch.randint(0, 256, (B, P), generator=torch.Generator().manual_seed(1)).to(device)
    runs = [(name, True) for name in models] + [("mha", False)]
    best: dict = {}
    for name, use_cache in runs:  # warm-up
        _decode(models[name], prompt[:, :8], 2, use_cache, device)
    for _ in range(repeats):
        for name, use_cache in runs:
            steps = N if use_cache else max(N // 8, 1)
            pre, dec, nbytes = _decode(models[name], prompt, steps, use_cache, device)
            dec *= N / steps  # per N tokens, so decode_s compares across rows
            key = name if use_cache else "mha_no_cache"
            old = best.get(key)
            if old is None or dec < old["decode_s"]:
                best[key] = {"prefill_s": pre, "decode_s": dec, "cache_bytes": nbytes}
    base = best["mha"]
    records = []
    for key, r in best.items():
        nkv = {"mha": H, "gqa": 2, "mqa": 1, "mha_no_cache": H}[key]
        records.append({
            "model": key, "num_query_heads": H, "num_kv_heads": nkv, "kv_cache": key != "mha_no_cache",
            "decode_tokens_per_s": B * N / r["decode_s"], "decode_s": r["decode_s"], "prefill_s": r["prefill_s"],
            "cache_bytes": r["cache_bytes"], "cache_bytes_vs_mha": r["cache_bytes"] / base["cache_bytes"],
            "decode_speed_vs_mha": base["decode_s"] / r["decode_s"],
        })
    doc = {"machine": {"torch": torch.__version__, "device": str(device), "cpu_count": os.cpu_count(),
                       "threads": torch.get_num_threads(), "python": platform.python_version(),
                       "dtype": str(dtype), "date": time.strftime("%Y-%m-%d %H:%M")},
           "shape": {"batch": B, "prompt": P, "new_tokens": N, "embed_dim": E, "query_heads": H, "layers": L,
                     "repeats": repeats},
           "records": records}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    for r in records:
        print(f"{r['model']:>13}: {r['decode_tokens_per_s']:8.1f} tok/s ({r['decode_speed_vs_mha']:.2f}x MHA), "
              f"cache {r['cache_bytes'] / 2**20:6.2f} MiB ({r['cache_bytes_vs_mha']:.3f}x), prefill {r['prefill_s']*1e3:.0f} ms")
    return doc


if __name__ == "__main__":
    main()

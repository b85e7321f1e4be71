"""Predicts the scaling of one attention layer from dist_mha's byte formulas.

    python bench/cost_model.py [--out bench/results/cost_model.json]

Two tables (markdown on stdout, everything in the JSON):

1. Tensor parallelism of one B=8 T=2048 E=4096 bf16 layer (TP, TP+SP) within
   and across nodes.
2. Long context: one B=1 T=32k E=4096 bf16 layer (32 query heads, 8 key/value
   heads) on 8, 16, 32 and 64 GPUs, 8 per node: TP, ring CP, Ulysses CP and
   TP=8 inside a node x CP across nodes.

Compute time per rank is FLOPs / p at an assumed sustained rate. Communication
is the wire bytes of `dist_mha.parallel.cost_model` over the slowest link the
group spans (NVLink inside a node, InfiniBand across nodes). TP and Ulysses
collectives block; ring sends overlap the block computations, so only the
part of a ring step's transfer that outlasts its compute is exposed. These
are predictions from stated assumptions, not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dist_mha.parallel.cost_model import (  # noqa: E402
    CallShape,
    cp_wire_bytes,
    tp_payloads,
    wire_bytes,
)

# Assumptions (per GPU, one direction): NVLink 4 on H100 SXM ~ 450 GB/s peak, ~360 GB/s achieved by
# NCCL ring all-reduce bus bandwidth; InfiniBand NDR 400 Gb/s = 50 GB/s peak, ~40 GB/s achieved.
NVLINK, IB = 360e9, 40e9
LINKS = {"NVLink (8 GPUs/node)": NVLINK, "InfiniBand NDR (across nodes)": IB}
SUSTAINED_FLOPS = 565e12  # the hand-fused bf16 baseline measured on one H100 (fwd+bwd)
GPUS_PER_NODE = 8


def flops(c: CallShape, kv_heads: int | None = None, causal: bool = False) -> float:
    """Forward+backward FLOPs of one layer call (projections, attention, output)."""
    kv = c.N if kv_heads is None else kv_heads
    proj = 2 * c.B * c.T * c.Dq * c.N * c.H + 2 * c.B * c.S * (c.Dk * kv * c.H + c.Dv * kv * c.Hv)
    attn = 2 * c.B * c.N * c.T * c.S * (c.H + c.Hv) * (0.5 if causal else 1.0)
    out = 2 * c.B * c.T * c.N * c.Hv * c.O
    return 3 * (proj + attn + out)


def tp_table():
    c = CallShape(B=8, T=2048, S=2048, Dq=4096, Dv=4096, Dk=4096, O=4096, N=32, H=128, Hv=128, bytes_per_element=2)
    rows = []
    for link, bw in LINKS.items():
        for p in (1, 2, 4, 8):
            compute = flops(c) / p / SUSTAINED_FLOPS
            for sp in (False, True):
                pay = tp_payloads(c, p, sp)
                sent = sum(wire_bytes(op, n, p) for ph in pay.values() for op, n in ph)
                comm = sent / bw
                rows.append(dict(link=link, p=p, scheme="TP+SP" if sp else "TP", wire_MB=round(sent / 1e6, 1),
                                 compute_ms=round(compute * 1e3, 3), comm_ms=round(comm * 1e3, 3),
                                 efficiency=round(compute / (compute + comm), 3)))
    return c, rows


def _span_bw(ranks: int) -> float:
    return NVLINK if ranks <= GPUS_PER_NODE else IB


def long_context_table():
    kv = 8
    c = CallShape(B=1, T=32768, S=32768, Dq=4096, Dv=4096, Dk=4096, O=4096, N=32, H=128, Hv=128, bytes_per_element=2,
                  cross=False)
    rows = []
    for gpus in (8, 16, 32, 64):
        layouts = [("TP", gpus, 1, None), ("CP ring", 1, gpus, "ring"), ("CP Ulysses", 1, gpus, "ulysses"),
                   ("TP8 x CP ring", 8, gpus // 8, "ring"), ("TP8 x CP Ulysses", 8, gpus // 8, "ulysses")]
        for name, tp, cp, mode in layouts:
            if c.N % tp or (mode == "ulysses" and (c.N // tp) % cp) or (cp == 1 and mode is not None):
                continue
            total = flops(c, kv, causal=True) / SUSTAINED_FLOPS
            compute = total / (tp * cp)
            tp_comm = 0.0
            if tp > 1:
                # TP collectives act on this rank's tokens (T / cp).
                local = CallShape(**{**c.__dict__, "T": c.T // cp, "S": c.S // cp})
                pay = tp_payloads(local, tp)
                tp_comm = sum(wire_bytes(op, n, tp) for ph in pay.values() for op, n in ph) / _span_bw(tp)
            cp_comm = exposed = 0.0
            if cp > 1:
                sent = cp_wire_bytes(c, cp, mode, tp, kv)
                # The CP group strides over TP: it spans tp * cp consecutive ranks.
                cp_comm = (sent["forward"] + sent["backward"]) / _span_bw(tp * cp)
                if mode == "ring":
                    attn = 2 * c.B * c.N * c.T * c.S * (c.H + c.Hv) * 0.5 * 3 / SUSTAINED_FLOPS / (tp * cp)
                    exposed = max(0.0, cp_comm - attn)  # sends overlap the blocks' compute
                else:
                    exposed = cp_comm
            step = compute + tp_comm + exposed
            rows.append(dict(gpus=gpus, layout=name, tp=tp, cp=cp, compute_ms=round(compute * 1e3, 2),
                             tp_comm_ms=round(tp_comm * 1e3, 2), cp_comm_ms=round(cp_comm * 1e3, 2),
                             exposed_comm_ms=round((tp_comm + exposed) * 1e3, 2),
                             efficiency=round(compute / step, 3), tokens_per_rank=c.T // cp,
                             weight_MB_per_rank=round(2 * (2 * c.Dq * c.N * c.H + 2 * c.Dk * kv * c.H) / tp / 1e6, 1)))
    return c, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    c, rows = tp_table()
    print("| link | p | scheme | wire MB/rank | compute ms | comm ms | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['link']} | {r['p']} | {r['scheme']} | {r['wire_MB']} | {r['compute_ms']} | {r['comm_ms']} | {r['efficiency']} |")
    lc, lrows = long_context_table()
    print("\nLong context: B=1 T=32k E=4096, 32 query / 8 key-value heads, causal, bf16, 8 GPUs per node")
    print("| GPUs | layout | compute ms | TP comm ms | CP comm ms (ring: overlapped) | exposed comm ms | efficiency | tokens/rank | weights MB/rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in lrows:
        print(f"| {r['gpus']} | {r['layout']} | {r['compute_ms']} | {r['tp_comm_ms']} | {r['cp_comm_ms']} | "
              f"{r['exposed_comm_ms']} | {r['efficiency']} | {r['tokens_per_rank']} | {r['weight_MB_per_rank']} |")
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"tp": {"shape": c.__dict__, "rows": rows}, "long_context": {"shape": lc.__dict__, "rows": lrows},
                       "links_bytes_per_s": LINKS, "flops_per_s": SUSTAINED_FLOPS}, f, indent=2)


if __name__ == "__main__":
    main()

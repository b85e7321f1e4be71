"""Predicts tensor-parallel scaling of one attention layer from dist_mha's byte formulas.

    python bench/cost_model.py [--out bench/results/cost_model.json]

Compute time per rank is FLOPs / p at an assumed sustained rate; communication
is the ring wire bytes of `dist_mha.parallel.cost_model` over an assumed
per-GPU bandwidth, not overlapped with compute (Megatron-style TP blocks on
its all-reduces). Prints a markdown table.
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
LINKS = {"NVLink (8 GPUs/node)": 360e9, "InfiniBand NDR (across nodes)": 40e9}
SUSTAINED_FLOPS = 565e12  # the hand-fused bf16 baseline measured on one H100 (fwd+bwd)


def flops(c: CallShape) -> float:
    fwd = 2 * c.B * c.T * c.Dq * c.N * c.H * 2 + 2 * c.B * c.T * c.Dv * c.N * c.Hv  # q, k, v projections
    fwd += 2 * c.B * c.N * c.T * c.S * (c.H + c.Hv) + 2 * c.B * c.T * c.N * c.Hv * c.O
    return 3 * fwd  # forward + backward


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
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
                                 efficiency=round(compute * p / (p * (compute + comm)), 3)))
            cp = cp_wire_bytes(c, p)
            cp_comm = (cp["forward"] + cp["backward"]) / bw
            rows.append(dict(link=link, p=p, scheme="CP (ring, estimate)", wire_MB=round((cp["forward"] + cp["backward"]) / 1e6, 1),
                             compute_ms=round(compute * 1e3, 3), comm_ms=round(cp_comm * 1e3, 3),
                             efficiency=round(compute / (compute + cp_comm) if p > 1 else 1.0, 3)))
    print("| link | p | scheme | wire MB/rank | compute ms | comm ms | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['link']} | {r['p']} | {r['scheme']} | {r['wire_MB']} | {r['compute_ms']} | {r['comm_ms']} | {r['efficiency']} |")
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"shape": c.__dict__, "links_bytes_per_s": LINKS, "flops_per_s": SUSTAINED_FLOPS, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""Bytes a tensor-parallel attention call communicates, and what that costs.

Shape legend: B batch, T query length, S key length, Dq/Dk/Dv input
features, O output features (prod(output_shape)), N heads, H/Hv head sizes,
p ranks in the group, b bytes per element.

Payload = the tensor handed to one collective (what the tests count).
Wire bytes = what each rank sends for it with the usual ring algorithms:
all-reduce 2(p-1)/p x payload, all-gather and reduce-scatter (p-1)/p x the
full (gathered) tensor, all-to-all (p-1)/p x payload.

| scheme | forward | backward |
|---|---|---|
| TP | all-reduce B*T*O | all-reduce B*(T*Dq + S*Dv [+ S*Dk]) (one, fused) |
| TP + SP | all-gather per distinct input; reduce-scatter B*T*O | all-gather B*T*O; reduce-scatter per input; all-reduce O (bias) |
| CP ring | (p-1) sends of the K/V block B*S/p*k*(H+Hv) | (p-1) K/V sends + p dK/dV sends (float32 for half inputs) |
| CP Ulysses | all-to-all of q B*T/p*n*H, k and v (or an all-gather when k < p), and of the output B*T*n/p*Hv | the same (autograd twins) |

n / k are the query / key-value heads on one TP rank. Ring sends overlap the
block computations (`ring.py`); the TP and Ulysses collectives do not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallShape:
    B: int
    T: int
    S: int
    Dq: int
    Dv: int
    Dk: int
    O: int
    N: int
    H: int
    Hv: int
    bytes_per_element: int = 4
    cross: bool = False  # query is not value
    separate_key: bool = False  # key given and not value


def tp_payloads(c: CallShape, p: int, sequence_parallel: bool = False) -> dict:
    """`{"forward": [(op, payload_bytes)], "backward": [...]}` for one layer call on one rank."""
    b = c.bytes_per_element
    inputs = [c.B * c.T * c.Dq]
    if c.cross:
        inputs.append(c.B * c.S * c.Dv)
    if c.separate_key:
        inputs.append(c.B * c.S * c.Dk)
    out = c.B * c.T * c.O
    if not sequence_parallel:
        return {"forward": [("all_reduce", out * b)], "backward": [("all_reduce", sum(inputs) * b)]}
    # SP collectives are handed local shards: gathers take 1/p of the full tensor.
    fwd = [("all_gather", n // p * b) for n in inputs] + [("reduce_scatter", out * b)]
    bwd = [("all_gather", out // p * b)] + [("reduce_scatter", n * b) for n in inputs] + [("all_reduce", c.O * b)]
    return {"forward": fwd, "backward": bwd}


def wire_bytes(op: str, payload: int, p: int) -> float:
    """Bytes each rank sends for one collective with ring algorithms."""
    if p == 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (p - 1) / p * payload
    if op == "all_gather":
        return (p - 1) * payload  # payload is the local shard
    if op in ("reduce_scatter", "all_to_all"):
        return (p - 1) / p * payload
    raise ValueError(f"unknown collective {op!r}")


def cp_payloads(c: CallShape, p: int, mode: str, tp: int = 1, kv_heads: int | None = None) -> dict:
    """Context parallelism: `{"forward": [(op, payload_bytes)], "backward": [...]}` for one call on one rank.

    `op` is "p2p" (one send; ring) or "all_to_all" (Ulysses; with fewer key/value
    heads than CP ranks each rank sends every peer one head of its rows).
    `kv_heads`: key/value heads of the layer (default N). `c.T`, `c.S` are global.
    """
    b = c.bytes_per_element
    n = c.N // tp
    k = max((c.N if kv_heads is None else kv_heads) // tp, 1)
    t, s = c.T // p, c.S // p
    if mode == "ring":
        kv = c.B * s * k * (c.H + c.Hv)
        acc = max(b, 4)  # dK/dV travel in float32 (float64 for float64)
        return {"forward": [("p2p", kv * b)] * (p - 1),
                "backward": [("p2p", kv * b)] * (p - 1) + [("p2p", kv * acc)] * p}
    if mode == "ulysses":
        q_op = ("all_to_all", c.B * t * n * c.H * b)
        out_op = ("all_to_all", c.B * c.T * (n // p) * c.Hv * b)
        heads = k if k % p == 0 else p  # fewer key/value heads than ranks: one head of its rows per peer
        kv = [("all_to_all", c.B * s * heads * c.H * b), ("all_to_all", c.B * s * heads * c.Hv * b)]
        return {"forward": [q_op, *kv, out_op], "backward": [q_op, *kv, out_op]}
    raise ValueError(f"unknown cp mode {mode!r}")


def cp_wire_bytes(c: CallShape, p: int, mode: str = "ring", tp: int = 1, kv_heads: int | None = None) -> dict:
    """Bytes each rank sends per call for context parallelism: `{"forward": n, "backward": n}`."""
    pay = cp_payloads(c, p, mode, tp, kv_heads)
    return {phase: sum(n if op == "p2p" else wire_bytes(op, n, p) for op, n in ops) for phase, ops in pay.items()}


def predict_seconds(c: CallShape, p: int, bandwidth_bytes_per_s: float, sequence_parallel: bool = False) -> float:
    """Communication time of one forward+backward call at the given per-rank bandwidth."""
    pay = tp_payloads(c, p, sequence_parallel)
    sent = sum(wire_bytes(op, n, p) for phase in pay.values() for op, n in phase)
    return sent / bandwidth_bytes_per_s

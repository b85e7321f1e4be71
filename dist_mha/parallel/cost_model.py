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
| CP (ring) | (p-1) K/V shard exchanges: B*S/p*N*(H+Hv) each | 2x forward (K/V and their gradients) |

Context parallelism is not implemented; its row is the standard ring-attention
estimate, for comparison.
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


def cp_wire_bytes(c: CallShape, p: int) -> dict:
    """Ring context parallelism: each rank passes its K/V shard around the ring."""
    shard = c.B * (c.S // p) * c.N * (c.H + c.Hv) * c.bytes_per_element
    return {"forward": (p - 1) * shard, "backward": 2 * (p - 1) * shard}


def predict_seconds(c: CallShape, p: int, bandwidth_bytes_per_s: float, sequence_parallel: bool = False) -> float:
    """Communication time of one forward+backward call at the given per-rank bandwidth."""
    pay = tp_payloads(c, p, sequence_parallel)
    sent = sum(wire_bytes(op, n, p) for phase in pay.values() for op, n in phase)
    return sent / bandwidth_bytes_per_s

"""The gated feed-forward of Llama-style decoders, tensor-parallel (Megatron's MLP split).

Shape legend: B batch, T sequence (T/tp per rank under sequence parallelism),
E features, I intermediate features (I/tp per rank).

    x -> [enter TP region] -> gate (column-parallel), up (column-parallel)
      -> act(gate) * up -> down (row-parallel) -> [leave: all-reduce / reduce-scatter]

One all-reduce forward (in `down`) and one backward (the input's gradient):
gate and up read one entered copy of the input, so their input gradients are
summed before the one backward all-reduce instead of costing one each.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from dist_mha.parallel import mesh
from dist_mha.parallel.collectives import copy_to_tp, gather_from_sp
from dist_mha.parallel.groups import size_of
from dist_mha.parallel.tp.linear import ColumnParallelLinear, RowParallelLinear


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": _gelu_tanh, "relu": F.relu}


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`: SwiGLU with `silu`, GeGLU with `gelu_pytorch_tanh`.

    Args:
        embed_dim: E.
        hidden_dim: I (divisible by the TP size).
        activation: a name in `ACTIVATIONS` (Hugging Face's `hidden_act` names).
        bias: biases on all three projections (Llama's `mlp_bias`).
        tp_group, sequence_parallel: as in `ColumnParallelLinear` (a 1-D DeviceMesh
            makes the weights DTensors: gate/up `Shard(0)`, down `Shard(1)`).
        cp_group: with a mesh, the CP axis (weights replicated over it, gradients averaged).
        init_base: seed of the initial weights (equal on every rank of a replica).
        initialize: False leaves the weights zero, for a caller that fills them.
        device, dtype: of the parameters.

    Call arguments:
        x: `(B, T, E)` (or `(B, T/tp, E)` under sequence parallelism).

    Returns:
        A tensor shaped like `x`.

    Raises:
        ValueError: for an unknown activation, or I not divisible by the TP size.

    Example:

    >>> GatedMLP(64, 128)(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 64])
    """

    def __init__(self, embed_dim: int, hidden_dim: int, *, activation: str = "silu", bias: bool = False,
                 tp_group=None, sequence_parallel: bool = False, cp_group=None, init_base=None, initialize=True,
                 device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Received an invalid value for argument `activation`, expected one of "
                             f"{sorted(ACTIVATIONS)}. Received: activation={activation!r}")
        self.activation = activation
        # The projections take the arguments as given (meshes make DTensor weights); collectives use the group.
        lin = dict(bias=bias, tp_group=tp_group, sequence_parallel=sequence_parallel, init_base=init_base,
                   cp_group=cp_group, initialize=initialize, device=device, dtype=dtype)
        tp_group, tp_mesh, _, cp_mesh = mesh.axes(tp_group, cp_group)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and size_of(tp_group) > 1
        self.gate = ColumnParallelLinear(embed_dim, hidden_dim, salt=11, **lin)
        self.up = ColumnParallelLinear(embed_dim, hidden_dim, salt=12, **lin)
        self.down = RowParallelLinear(hidden_dim, embed_dim, salt=13, **lin)
        if tp_mesh is not None or cp_mesh is not None:
            from dist_mha.parallel.dtensor import distribute

            # The forward reads gate/up weights itself (not through their forwards, whose hooks would
            # swap them): this hook puts their local tensors in place for the call.
            distribute(self, tp_mesh, cp_mesh)

    def forward(self, x):
        if size_of(self.tp_group) > 1:
            x = gather_from_sp(self.tp_group, x, 1) if self.sequence_parallel else copy_to_tp(self.tp_group, x)
        h = ACTIVATIONS[self.activation](F.linear(x, self.gate.weight, self.gate.bias)) * F.linear(
            x, self.up.weight, self.up.bias)
        return self.down(h)

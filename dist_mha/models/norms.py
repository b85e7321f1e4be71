"""RMSNorm as the Hugging Face decoder families compute it, sequence-parallel aware.

Shape legend: B batch, T sequence (T/tp per rank under sequence parallelism), E features.

Two variants, told apart by where the weight enters and where the result is cast:
- Llama, Mistral, Qwen2, Qwen3: `w * normalize(x).to(x.dtype)`, weight initialised to 1.
- Gemma (`unit_offset=True`): `(normalize(x) * (1 + w)).to(x.dtype)`, weight initialised to 0.
`normalize` runs in float32 for half-precision inputs (as HF does) and in the
input's own precision for float32 and float64 (HF downcasts float64 to float32
there; keeping float64 is what makes float64 runs a meaningful reference).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_mha.parallel import mesh
from dist_mha.parallel.collectives import copy_to_tp
from dist_mha.parallel.groups import size_of
from dist_mha.parallel.tp import placement


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dim, with a learned scale.

    Args:
        dim: E.
        eps: added to the mean square.
        unit_offset: scale by `1 + weight` (Gemma) instead of `weight`.
        tp_group, sequence_parallel: under sequence parallelism each rank
            normalises its own rows, so the weight's gradient is partial per
            rank; entering the weight through `copy_to_tp` sums it. A 1-D
            DeviceMesh makes the weight a (replicated) DTensor.
        cp_group: with a mesh, the CP axis (the weight is replicated over it,
            gradients averaged); a process group is not used.
        device, dtype: of the weight.

    Call arguments:
        x: `(..., E)`.

    Returns:
        A tensor shaped and typed like `x`.

    Example:

    >>> RMSNorm(64)(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 64])
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, unit_offset: bool = False, tp_group=None,
                 sequence_parallel: bool = False, cp_group=None, device=None, dtype=None):
        super().__init__()
        tp_group, tp_mesh, _, cp_mesh = mesh.axes(tp_group, cp_group)
        init = torch.zeros if unit_offset else torch.ones
        self.weight = nn.Parameter(init(dim, device=device, dtype=dtype))
        self.eps, self.unit_offset = float(eps), bool(unit_offset)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and size_of(tp_group) > 1
        # Replicated: without SP every rank's gradient is already the full one; under SP the forward's
        # `copy_to_tp` sums the rows' partial gradients, so it is not `partial_grad` either way.
        placement.declare(self, "weight", placement.replicate())
        if tp_mesh is not None or cp_mesh is not None:
            from dist_mha.parallel.dtensor import distribute

            distribute(self, tp_mesh, cp_mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = copy_to_tp(self.tp_group, self.weight) if self.sequence_parallel else self.weight
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (y * (1.0 + w.to(compute))).to(x.dtype)  # Gemma: scale in float32, cast after
        return w * y.to(x.dtype)  # Llama: cast, then scale

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"

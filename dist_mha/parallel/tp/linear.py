"""Column- and row-parallel linear layers (Megatron's MLP split).

Shape legend: B batch, T sequence (T/tp per rank under sequence parallelism),
I input features, O output features.

`ColumnParallelLinear` keeps `O/tp` output features per rank (weight `(O/tp, I)`),
taking a replicated input (or gathering a sequence-sharded one) and giving a
feature-sharded output. `RowParallelLinear` takes that feature-sharded input
(weight `(O, I/tp)`), sums the ranks' partial outputs and adds the replicated
bias once. Their weights are initialised blockwise from the global shape
(Keras's glorot_uniform through the counter RNG, zero bias), so results do not
depend on the TP degree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dist_mha.parallel import mesh, region
from dist_mha.parallel.agreement import agreed_random_base
from dist_mha.parallel.collectives import copy_to_tp, gather_from_sp
from dist_mha.parallel.groups import rank_of, size_of
from dist_mha.parallel.tp import placement, reshard
from dist_mha.parallel.tp.grads import mark_sharded
from dist_mha.rng import counter


def _distribute(module, tp_mesh, cp_mesh) -> None:
    if tp_mesh is not None or cp_mesh is not None:
        from dist_mha.parallel.dtensor import distribute

        distribute(module, tp_mesh, cp_mesh)


class _ParallelLinear(nn.Module):
    shard_dim = 0  # of the weight

    def __init__(self, in_features, out_features, *, bias=True, tp_group=None, sequence_parallel=False,
                 device=None, dtype=None, salt=0, init_base=None, cp_group=None, initialize=True):
        super().__init__()
        tp_group, tp_mesh, _, cp_mesh = mesh.axes(tp_group, cp_group)
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = size_of(tp_group), rank_of(tp_group)
        self.sequence_parallel = sequence_parallel
        units = out_features if self.shard_dim == 0 else in_features
        if units % self.tp_size:
            valid = [d for d in range(1, units + 1) if units % d == 0]
            raise ValueError(
                f"{type(self).__name__}: {units} features do not split across a TP group of "
                f"{self.tp_size}; valid TP sizes: {valid}."
            )
        self.in_features, self.out_features, self.units = in_features, out_features, units
        global_shape = (out_features, in_features)
        local = list(global_shape)
        local[self.shard_dim] //= self.tp_size
        index = (slice(None),) * self.shard_dim + (slice(self.tp_rank * local[self.shard_dim], (self.tp_rank + 1) * local[self.shard_dim]),)
        if initialize:
            base = agreed_random_base(tp_group) if init_base is None else init_base
            limit = math.sqrt(6.0 / (in_features + out_features))  # Keras's glorot_uniform
            u = counter.uniform(counter.mix64(base, salt), global_shape, index, device=device)
            self.weight = nn.Parameter(((u * 2.0 - 1.0) * limit).to(dtype or torch.get_default_dtype()))
        else:  # the caller fills it (a checkpoint): no random draw, no transient larger than the weight
            self.weight = nn.Parameter(torch.zeros(local, device=device, dtype=dtype or torch.get_default_dtype()))
        bias_local = out_features // self.tp_size if self.shard_dim == 0 else out_features
        self.bias = nn.Parameter(torch.zeros(bias_local, device=device, dtype=self.weight.dtype)) if bias else None
        mark_sharded(self.weight, self.bias if self.shard_dim == 0 else None)
        placement.declare(self, "weight", placement.shard(self.shard_dim, units))
        placement.declare(self, "bias", placement.shard(0, units) if self.shard_dim == 0 else placement.replicate())
        _distribute(self, tp_mesh, cp_mesh)

    def get_extra_state(self):
        bias_dim = 0 if self.shard_dim == 0 else None
        return reshard.extra_state(self, {"weight": self.shard_dim, "bias": bias_dim}, self.units, "features")

    def set_extra_state(self, state):
        reshard.check_extra_state(self, state, type(self).__name__)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, tp={self.tp_size}, local_weight={tuple(self.weight.shape)}"


class ColumnParallelLinear(_ParallelLinear):
    """`(B, T, I)` replicated (or `(B, T/tp, I)` under SP) -> `(B, T, O/tp)`.

    Args:
        in_features, out_features: global sizes.
        bias: whether each rank adds its slice of the bias.
        tp_group: process group, a 1-D DeviceMesh (DTensor parameters), or None.
        sequence_parallel: the input is sharded on dim 1 and gathered here.
        device, dtype: of the parameters.
        salt: tells apart the weights that share `init_base`.
        init_base: the seed of the initial weights, equal on every rank that
            replicates the model (a block passes the one it agreed over TP x CP);
            None: `agreed_random_base(tp_group)`, rank 0's draw from torch's RNG.
        cp_group: with meshes, the CP axis: parameters are replicated over it
            (gradients averaged); process groups: unused.
        initialize: False leaves the weight zero, for a caller that fills it.
    """

    shard_dim = 0

    def forward(self, x):
        if self.tp_size > 1:
            x = gather_from_sp(self.tp_group, x, 1) if self.sequence_parallel else copy_to_tp(self.tp_group, x)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(_ParallelLinear):
    """`(B, T, I/tp)` -> `(B, T, O)` replicated (or `(B, T/tp, O)` under SP).

    Args: as `ColumnParallelLinear`; the bias is replicated and added once.
    """

    shard_dim = 1

    def forward(self, x):
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        return region.leave(self.tp_group, self.sequence_parallel, F.linear(x, self.weight), self.bias)


class ParallelLayerNorm(nn.LayerNorm):
    """LayerNorm whose (replicated) parameters stay in sync under sequence parallelism.

    With SP each rank normalises only its rows, so its parameter gradients are
    partial; entering the parameters through `copy_to_tp` sums them.
    """

    def __init__(self, normalized_shape, *, tp_group=None, sequence_parallel=False, cp_group=None, **kwargs):
        super().__init__(normalized_shape, **kwargs)
        tp_group, tp_mesh, _, cp_mesh = mesh.axes(tp_group, cp_group)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and size_of(tp_group) > 1
        # Replicated; under SP `copy_to_tp` in the forward sums the rows' partial gradients.
        placement.declare(self, "weight", placement.replicate())
        placement.declare(self, "bias", placement.replicate())
        _distribute(self, tp_mesh, cp_mesh)

    def forward(self, x):
        if not self.sequence_parallel:
            return super().forward(x)
        w, b = copy_to_tp(self.tp_group, self.weight, self.bias)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)

"""The dense projections of attention, with Keras-layout kernels.

Shape legend: D input features, N query heads, K key/value heads, H head
size, O output features.

Keras's EinsumDense kernels are `(D, N, H)` for query (and gate), `(D, K, H)`
for key/value (K == N for multi-head attention), and `(N, Hv, *output_shape)`
for the output. They are stored in that layout so
`get_weights`/`set_weights` are copies, and so a tensor-parallel rank can own
a contiguous block of heads. The einsum is one GEMM on flattened views.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dist_mha.parallel.tp import placement, sharding
from dist_mha.parallel.tp.grads import mark_sharded

# Stable per-weight salts: each kernel (and bias) gets its own random draw,
# independent of build order and of the other weights' shapes.
_SALTS = {"query": 1, "key": 2, "value": 3, "attention_output": 4, "gate": 5}


class EinsumProjection(nn.Module):
    """`(..., *in_dims) -> (..., *out_dims)` with kernel `(*in_dims, *out_dims)`.

    Args:
        name: Keras sublayer name ("query", "key", "value", "gate", "attention_output").
        in_dims: contracted trailing dims of the input.
        out_dims: dims produced.
        use_bias: whether a bias of shape `out_dims` is added.
        equation: Keras's einsum equation for this projection (informational).
        activation: None or "sigmoid" (the gate).
        dtype, device: of the parameters.
    """

    def __init__(
        self, name, in_dims, out_dims, use_bias, equation, *, activation=None, dtype=None, device=None,
        kernel_shard_dim=None, bias_shard_dim=None, global_kernel_shape=None, global_bias_shape=None,
        shard_units=1, replicas=1,
    ):
        super().__init__()
        self.name = name
        self.in_dims = tuple(in_dims)
        self.out_dims = tuple(out_dims)
        self.equation = equation
        self.activation = activation
        self.kernel = nn.Parameter(torch.empty(*self.in_dims, *self.out_dims, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(*self.out_dims, dtype=dtype, device=device)) if use_bias else None
        # Tensor parallelism: which dim of the local kernel/bias is a shard of
        # the global one (None: replicated), and the global shapes.
        self.kernel_shard_dim = kernel_shard_dim
        self.bias_shard_dim = bias_shard_dim
        self.global_kernel_shape = tuple(global_kernel_shape or self.kernel.shape)
        self.global_bias_shape = tuple(global_bias_shape or self.out_dims)
        # The sharded dim holds `shard_units` heads in full; each is held by
        # `replicas` ranks (> 1 only for key/value heads fewer than TP ranks).
        self.shard_units = shard_units
        self.replicas = replicas
        placement.declare(self, "kernel", placement.replicate() if kernel_shard_dim is None
                          else placement.shard(kernel_shard_dim, shard_units))
        placement.declare(self, "bias", placement.replicate() if bias_shard_dim is None
                          else placement.shard(bias_shard_dim, shard_units))

    @property
    def partial_output_shape(self):
        return self.out_dims

    def forward(self, x: torch.Tensor, add_bias: bool = True, weights=None) -> torch.Tensor:
        """`weights`: optional `(kernel, bias)` to use instead of the parameters (replica-synced views)."""
        lead = x.shape[: x.dim() - len(self.in_dims)]
        kernel, bias = weights if weights is not None else (self.kernel, self.bias)
        bias = bias if add_bias else None
        if x.dtype != kernel.dtype and not torch.is_autocast_enabled(x.device.type):
            # The output follows the input's dtype (Keras would autocast to its policy).
            kernel = kernel.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        k_in, k_out = math.prod(self.in_dims), math.prod(self.out_dims)
        y = F.linear(
            x.reshape(*lead, k_in), kernel.reshape(k_in, k_out).t(), None if bias is None else bias.reshape(k_out)
        )
        y = y.view(*lead, *self.out_dims)
        if self.activation == "sigmoid":
            y = torch.sigmoid(y)
        return y

    def extra_repr(self) -> str:
        return f"name={self.name!r}, equation={self.equation!r}, kernel={tuple(self.kernel.shape)}, bias={self.bias is not None}"


def projection_equation(free_dims: int, bound_dims: int, output_dims: int) -> str:
    """Keras's `_build_proj_equation`, for the `equation` attribute."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    free = letters[:free_dims]
    bound = letters[free_dims : free_dims + bound_dims]
    out = letters[free_dims + bound_dims : free_dims + bound_dims + output_dims]
    return f"{free}{bound},{bound}{out}->{free}{out}"


def build_projections(layer, dq: int, dv: int, dk: int, rank: int) -> list[EinsumProjection]:
    """The layer's projections in Keras's weight order, holding this TP rank's heads.

    q/[gate] kernels `(D, n, H)` are shards of `(D, N, H)` on dim 1 (biases on
    dim 0), `n = N / tp`; k/v kernels `(D, k, H)` are shards of `(D, K, H)`,
    `k = K / tp`, or one replicated head when `K < tp`; the output kernel
    `(n, Hv, *out)` is a shard of `(N, Hv, *out)` on dim 0 and its bias is
    replicated.
    """
    N, K, H, Hv = layer._num_heads, layer._num_kv_heads, layer._key_dim, layer._value_dim
    group = layer.tp_group
    n = N // layer.tp_size
    k0, k1 = sharding.head_range(K, group)
    kv_rep = sharding.replicas_of(K, group)
    out = layer._output_shape or (dq,)
    in_eq = projection_equation(rank - 1, 1, 2)
    # (name, in dims, local out dims, global kernel, kernel shard dim, bias shard dim, units, replicas, equation, activation)
    specs = [("query", (dq,), (n, H), (dq, N, H), 1, 0, N, 1, in_eq, None),
             ("key", (dk,), (k1 - k0, H), (dk, K, H), 1, 0, K, kv_rep, in_eq, None)]
    if layer._use_gate:
        specs.append(("gate", (dq,), (n, Hv), (dq, N, Hv), 1, 0, N, 1, in_eq, "sigmoid"))
    specs.append(("value", (dv,), (k1 - k0, Hv), (dv, K, Hv), 1, 0, K, kv_rep, in_eq, None))
    specs.append(("attention_output", (n, Hv), out, (N, Hv, *out), 0, None, N, 1,
                  projection_equation(rank - 1, 2, len(out)), None))
    projs = []
    for name, in_dims, out_dims, global_kernel, k_dim, b_dim, units, reps, eq, act in specs:
        use_bias = layer._use_bias
        if name == "attention_output" and layer._output_bias is not None:
            use_bias = layer._output_bias  # e.g. Qwen2: biases on q/k/v, none on the output
        proj = EinsumProjection(
            name, in_dims, out_dims, use_bias, eq, activation=act, dtype=layer._param_dtype,
            device=layer._device, kernel_shard_dim=k_dim, bias_shard_dim=b_dim, global_kernel_shape=global_kernel,
            global_bias_shape=global_kernel[len(in_dims):] if b_dim is not None else out,
            shard_units=units, replicas=reps,
        )
        mark_sharded(proj.kernel, proj.bias if b_dim is not None else None, replicas=reps, tp_size=layer.tp_size)
        projs.append(proj)
    return projs


def initialize(proj: EinsumProjection, kernel_init, bias_init, base: int, group) -> None:
    """Fills `proj` with its block of the global initial weights.

    Fans come from the global kernel; each element's value depends only on
    its global index, so shards at any TP degree assemble the same weight.
    """
    k_shape = proj.global_kernel_shape
    n_in = len(proj.in_dims)
    fan_in, fan_out = math.prod(k_shape[:n_in]), math.prod(k_shape[n_in:])
    salt = _SALTS[proj.name]
    with torch.no_grad():
        kernel = kernel_init(
            k_shape, proj.kernel.dtype, device=proj.kernel.device, fan_in=fan_in, fan_out=fan_out, salt=salt,
            base_seed=base, index=sharding.shard_index(k_shape, proj.kernel_shard_dim, proj.shard_units, group),
        )
        proj.kernel.copy_(torch.as_tensor(kernel))
        if proj.bias is not None:
            bias = bias_init(
                proj.global_bias_shape, proj.bias.dtype, device=proj.bias.device, salt=100 + salt, base_seed=base,
                index=sharding.shard_index(proj.global_bias_shape, proj.bias_shard_dim, proj.shard_units, group),
            )
            proj.bias.copy_(torch.as_tensor(bias))


class NormWeight(nn.Module):
    """The `(key_dim,)` weight of a QK-norm (RMSNorm of every head), shared by all heads; replicated under TP."""

    def __init__(self, key_dim: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(key_dim, dtype=dtype, device=device))
        placement.declare(self, "weight", placement.replicate())  # the forward enters it through copy_to_tp

    def extra_repr(self) -> str:
        return f"key_dim={self.weight.shape[0]}"


def build_extras(layer) -> None:
    """QK-norm weights (`query_norm`, `key_norm`) and attention sinks (`sinks`, this rank's heads), as asked.

    Norm weights start at 1 (the identity scale) and sinks at 0 (a logit as
    large as a key's whose score is 0); both are equal on every rank.
    """
    if layer._qk_norm is not None:
        for name in ("query_norm", "key_norm"):
            layer.add_module(name, NormWeight(layer._key_dim, layer._param_dtype, layer._device))
    if layer._attention_sinks:
        h0, h1 = sharding.head_range(layer._num_heads, layer.tp_group)
        layer.sinks = nn.Parameter(torch.zeros(h1 - h0, dtype=layer._param_dtype, device=layer._device))
        mark_sharded(layer.sinks, tp_size=layer.tp_size)
        placement.declare(layer, "sinks", placement.shard(0, layer._num_heads))

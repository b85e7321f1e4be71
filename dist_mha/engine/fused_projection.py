"""Self-attention's q/k/[gate]/v projections as one autograd node over `x`.

Shape legend: M tokens (every leading dim of `x` flattened), D input
features, n heads on this rank, H head size, W_i = n*H_i the output width of
projection i, W = sum of the W_i.

The kernels stay separate Keras-layout parameters `(D, n, H)` (so weights,
checkpoints, TP sharding and optimizers see Keras's structure), yet the call
costs what one `nn.Linear(D, W)` costs:

* forward: on CUDA, when there are at least as many tokens as input
  features (M >= D, the training regime), the kernels are concatenated into
  a transient `(D, W)` matrix and one GEMM with the bias fused runs (one
  wide GEMM fills the GPU's last wave better than three), and q/k/v are
  column views of its result. With fewer tokens (small batches, inference)
  copying the weights costs more than the GEMMs, and on CPU a fresh
  weight-sized buffer costs page faults while a wider GEMM runs no faster
  (B=8 T=128 E=256 float32, 2 cores: 2.11 ms concatenated vs 1.96 ms
  separate), so each projection runs its own GEMM there. Nothing
  weight-sized is kept for backward either way.
* backward: each output's gradient arrives on its own (no concatenation
  of dq/dk/dv, which autograd does for slices of one output);
  `dK_i = x^T dY_i` is computed straight into the parameter's own layout,
  so autograd hands it to `.grad` without the copy it makes for a slice of
  a fused gradient; `dx = sum_i dY_i K_i^T` accumulates in place (no
  concatenated weight is rebuilt).

Letting autograd differentiate `torch.cat(kernels)` instead keeps a
`(D, W)` copy alive from forward to backward and clones each kernel's
gradient out of the fused one: +8% peak memory at B=1 T=2048 E=512, +46% at
T=512 E=1024 (CPU, float32, `bench/README.md`).
"""

from __future__ import annotations

import torch


def concat_weights(x_MD: torch.Tensor) -> bool:
    """Whether the forward concatenates the kernels into one GEMM (see the module docstring)."""
    return x_MD.device.type == "cuda" and x_MD.shape[0] >= x_MD.shape[1]


def _project_MD(x_MD, kernels_DW, biases):
    """The forward GEMMs: `(outputs, x and kernels in the compute dtype)`."""
    device_type = x_MD.device.type
    # Autocast (or inputs in another dtype than the weights) runs the GEMMs
    # in the compute dtype; the weights are cast once here, as autocast's own
    # linear would do. With every operand in that dtype, autocast (still
    # active inside a Function's forward) has nothing left to cast.
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_MD.dtype
    if x_MD.dtype != dtype or kernels_DW[0].dtype != dtype:
        x_MD = x_MD.to(dtype)
        kernels_DW = [k.to(dtype) for k in kernels_DW]
        biases = [b.to(dtype) for b in biases]
    if concat_weights(x_MD):
        weight = torch.cat(kernels_DW, dim=1)
        y_MW = torch.mm(x_MD, weight) if not biases else torch.addmm(torch.cat(biases), x_MD, weight)
        del weight
        outs = y_MW.split([k.shape[1] for k in kernels_DW], dim=1)
    elif biases:
        outs = [torch.addmm(b, x_MD, k) for k, b in zip(kernels_DW, biases)]
    else:
        outs = [torch.mm(x_MD, k) for k in kernels_DW]
    return tuple(outs), x_MD, kernels_DW


class _FusedInProjection(torch.autograd.Function):
    """`x_MD -> (y_MW_0, y_MW_1, ...)`, `y_i = x K_i + b_i`; one output per projection."""

    @staticmethod
    def forward(ctx, x_MD, n_kernels, *weights):
        outs, x_MD, kernels_DW = _project_MD(x_MD, weights[:n_kernels], weights[n_kernels:])
        ctx.save_for_backward(x_MD, *kernels_DW)
        ctx.has_bias = len(weights) > n_kernels
        return outs

    @staticmethod
    def backward(ctx, *dys_MW):
        x_MD, *kernels_DW = ctx.saved_tensors
        dys_MW = [dy.to(x_MD.dtype) for dy in dys_MW]
        n = len(kernels_DW)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dys_MW[0], kernels_DW[0].t())
            for dy, k in zip(dys_MW[1:], kernels_DW[1:]):
                dx.addmm_(dy, k.t())
        dks = [torch.mm(x_MD.t(), dy) if need else None for dy, need in zip(dys_MW, ctx.needs_input_grad[2:2 + n])]
        dbs = []
        if ctx.has_bias:
            dbs = [dy.sum(0) if need else None for dy, need in zip(dys_MW, ctx.needs_input_grad[2 + n:])]
        return (dx, None, *dks, *dbs)


def fused_self_projection(projections, x: torch.Tensor, weights=None):
    """Self-attention's q/k/[gate]/v projections of `x` as one fused call.

    Args:
        projections: `[query, key, gate or None, value]` `EinsumProjection`s
            over the same input features, all with or all without bias.
        x: `(..., D)`.
        weights: optional `(kernel, bias)` per projection, used instead of
            its parameters (replica-synced views under tensor parallelism).

    Returns:
        `(q, k, gate or None, v)`, each `(..., n, H)`, with the values the
        separate projections give (the gate's sigmoid applied).
    """
    weights = weights or [None] * len(projections)
    used = [(p, w or (p.kernel, p.bias)) for p, w in zip(projections, weights) if p is not None]
    lead, d = x.shape[:-1], x.shape[-1]
    kernels = [k.reshape(d, -1) for _, (k, _) in used]
    biases = [] if used[0][1][1] is None else [b.reshape(-1) for _, (_, b) in used]
    if torch.is_grad_enabled():
        ys = _FusedInProjection.apply(x.reshape(-1, d), len(kernels), *kernels, *biases)
    else:  # inference: the same GEMMs without the autograd.Function machinery (~20 us a call)
        ys = _project_MD(x.reshape(-1, d), kernels, biases)[0]
    outs = []
    for (p, _), part in zip(used, ys):
        part = part.view(*lead, *p.out_dims)
        outs.append(torch.sigmoid(part) if p.activation == "sigmoid" else part)
    it = iter(outs)
    return tuple(None if p is None else next(it) for p in projections)


def project(projections, query, key, value, weights=None):
    """`(q, k, gate or None, v)`; the projections of one tensor run as one fused node.

    Self-attention fuses all of them; cross-attention with `key=None` fuses
    key and value (and the gate with the query).

    Args:
        projections: `[query, key, gate or None, value]` `EinsumProjection`s.
        query, key, value: the (entered) call inputs; identity decides the fusion.
        weights: optional `[(kernel, bias) or None]` per projection, used
            instead of its parameters.
    """
    weights = weights or [None] * 4
    xs = (query, key, query, value)
    out = [None] * 4
    for i, (proj, x) in enumerate(zip(projections, xs)):
        if proj is None or out[i] is not None:
            continue
        same = [j for j in range(i, 4) if projections[j] is not None and xs[j] is x]
        if len(same) == 1:
            out[i] = proj(x, weights=weights[i])
            continue
        fused = fused_self_projection([projections[j] for j in same], x, [weights[j] for j in same])
        for j, y in zip(same, fused):
            out[j] = y
    return tuple(out)

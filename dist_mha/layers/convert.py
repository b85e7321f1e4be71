"""Weights between `torch.nn.MultiheadAttention` and `dist_mha.MultiHeadAttention`.

Shape legend: E embed dim, N heads, H head size (E / N), Dk/Dv key/value features.

torch keeps `in_proj_weight` `(3E, E)` = [Wq; Wk; Wv] (or separate
`q/k/v_proj_weight` when kdim/vdim differ), `in_proj_bias` `(3E,)`, and
`out_proj` `(E, E)`; y = x W^T + b. Keras's kernels are `(D, N, H)` (q/k/v) and
`(N, H, E)` (output): transposes of torch's, split into heads. Both scale
scores by 1/sqrt(H), so outputs agree to float rounding.

Masks differ in sign: torch's bool `attn_mask` and `key_padding_mask` are True
where attention is NOT allowed; ours are True where it is.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_mha.layers.multi_head_attention import MultiHeadAttention


def from_torch_mha(mha: nn.MultiheadAttention, **kwargs) -> MultiHeadAttention:
    """A dist_mha layer with the weights of `mha` (same outputs).

    Args:
        mha: a `torch.nn.MultiheadAttention` (batch_first or not: call ours with batch-first tensors).
        **kwargs: extra `MultiHeadAttention` arguments (`tp_group`, `seed`, ...).

    Returns:
        A built `MultiHeadAttention` on `mha`'s device and dtype.

    Raises:
        ValueError: for torch features Keras's layer has no counterpart for
            (`add_bias_kv`, `add_zero_attn`).
    """
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("Received a torch MultiheadAttention with add_bias_kv/add_zero_attn, which Keras's layer does not have.")
    E, N = mha.embed_dim, mha.num_heads
    H = E // N
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
    else:
        wq, wk, wv = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
    use_bias = mha.in_proj_bias is not None
    ref = wq
    layer = MultiHeadAttention(N, H, dropout=mha.dropout, use_bias=use_bias, query_shape=E, value_shape=wv.shape[1],
                               key_shape=wk.shape[1], device=ref.device, dtype=ref.dtype, **kwargs)
    weights = []
    biases = mha.in_proj_bias.detach().chunk(3) if use_bias else (None, None, None)
    for w, b in zip((wq, wk, wv), biases):
        weights.append(w.t().reshape(w.shape[1], N, H))
        if use_bias:
            weights.append(b.reshape(N, H))
    weights.append(mha.out_proj.weight.detach().t().reshape(N, H, E))
    if use_bias:
        weights.append(mha.out_proj.bias.detach())
    layer.set_weights([w.float().cpu().numpy() if w.dtype == torch.bfloat16 else w.cpu().numpy() for w in weights])
    return layer


def to_torch_mha(layer: MultiHeadAttention) -> nn.MultiheadAttention:
    """A `torch.nn.MultiheadAttention(batch_first=True)` with `layer`'s weights.

    Raises:
        ValueError: if `layer` uses features torch's module lacks (value_dim !=
            key_dim, output_shape, attention_axes other than the sequence,
            use_gate, sliding_window) or is unbuilt.
    """
    if not layer.built:
        raise ValueError("Build the layer (call it once or pass query_shape=) before converting it.")
    dq, dv, dk, rank = layer._built_dims
    N, H = layer.num_heads, layer.key_dim
    problems = []
    if layer.value_dim != H:
        problems.append(f"value_dim={layer.value_dim} != key_dim={H}")
    if layer._output_shape not in (None, (dq,)):
        problems.append(f"output_shape={layer._output_shape}")
    if rank != 3 or layer.attention_axes != (1,):
        problems.append(f"attention over axes {layer.attention_axes} of rank-{rank} inputs")
    if layer._use_gate or layer._sliding_window is not None:
        problems.append("use_gate/sliding_window")
    if N * H != dq:
        problems.append(f"num_heads*key_dim={N * H} != query features {dq}")
    if problems:
        raise ValueError(f"torch.nn.MultiheadAttention cannot express this layer: {'; '.join(problems)}.")
    w = [torch.as_tensor(a) for a in layer.get_weights()]
    use_bias = layer.use_bias
    kernels = w[0::2] if use_bias else w
    dtype = layer.query_dense.kernel.dtype
    mha = nn.MultiheadAttention(dq, N, dropout=layer.dropout, bias=use_bias, kdim=dk, vdim=dv, batch_first=True,
                                device=layer.query_dense.kernel.device, dtype=dtype)
    q, k, v, o = (kernels[i] for i in range(4))
    with torch.no_grad():
        mats = [q.reshape(dq, -1).t(), k.reshape(dk, -1).t(), v.reshape(dv, -1).t()]
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat(mats))
        else:
            mha.q_proj_weight.copy_(mats[0])
            mha.k_proj_weight.copy_(mats[1])
            mha.v_proj_weight.copy_(mats[2])
        mha.out_proj.weight.copy_(o.reshape(N * H, dq).t())
        if use_bias:
            mha.in_proj_bias.copy_(torch.cat([w[1].reshape(-1), w[3].reshape(-1), w[5].reshape(-1)]))
            mha.out_proj.bias.copy_(w[7])
    return mha

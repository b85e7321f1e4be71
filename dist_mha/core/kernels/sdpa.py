"""`torch.nn.functional.scaled_dot_product_attention` (torch picks cuDNN, flash,
memory-efficient or math underneath).

Shape legend: B batch, T query positions, S key positions, N query heads,
K key/value heads, H head size, Hv value head size.

Grouped-query attention (K < N) passes `enable_gqa=True`: torch's flash,
cuDNN and CPU kernels read each K/V head for its N/K query heads in place,
with no repeated copy (on torch < 2.5, which lacks the flag, K/V are repeated).

Causal-only attention goes through `is_causal` (no mask tensor). Query
padding never enters the mask: those rows are zeroed afterwards, so a
query+key padding pair costs a `(B, 1, 1, S)` mask, not `(B, 1, T, S)`.

On CUDA, torch's cuDNN backend is put first: on an H100 (torch 2.11, bf16,
head_dim 128) it ran 1.7-1.8x faster than SDPA's flash backend, and unlike
that backend it takes masks. torch still falls back to flash, efficient and
math, in that order, for inputs cuDNN refuses. One exception: with a mask
tensor and `S % 128 == 64`, cuDNN's backward can return NaN in dq (torch
2.11+, H100/H200, when a row's logsumexp is below about -88.7:
pytorch/pytorch#196678), so those calls put the memory-efficient kernel first.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dist_mha.core.kernels.request import (
    AttentionRequest,
    mask_with_live_rows,
    zero_rows,
)

NAME = "sdpa"
_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
_CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_CUDA_ORDER_MASKED_S64 = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.MATH]


def cuda_priority(S: int, has_mask: bool) -> list:
    """The SDPA backend order used on CUDA for `S` keys, with or without a mask tensor."""
    return _CUDA_ORDER_MASKED_S64 if has_mask and S % 128 == 64 else _CUDA_ORDER


def _priority(device, S, has_mask):
    if device.type != "cuda":
        return contextlib.nullcontext()
    try:
        return sdpa_kernel(cuda_priority(S, has_mask), set_priority=True)
    except TypeError:  # torch < 2.6: no priorities; torch's own order applies
        return contextlib.nullcontext()


def refusals(req: AttentionRequest) -> list[str]:
    """Why SDPA cannot serve `req` (empty when it can)."""
    reasons = []
    if req.need_scores:
        reasons.append("it does not return attention probabilities (return_attention_scores=True)")
    if req.dropout_p > 0 and req.dropout_keep is not None:
        reasons.append("TP-invariant dropout needs explicit masks, which only the math path applies")
    return reasons


def _all_rows_live(masks) -> bool:
    """True when key padding alone masks and every batch row keeps a key (no row needs zeroing).

    Checked on CPU only, in eager mode: on CUDA reading the answer would wait
    for the GPU, and under torch.compile it would break the graph.
    """
    if masks.dense_BNTS is not None or masks.causal or masks.window is not None or masks.k_keep_BS is None \
            or masks.q_seg_BT is not None:
        return False
    if masks.k_keep_BS.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(masks.k_keep_BS.any(dim=1).all())


def run(req: AttentionRequest):
    """Returns `(out_BTNH, None)`."""
    masks = req.masks
    keep = None
    causal_alone = masks.causal and masks.dense_BNTS is None and masks.k_keep_BS is None and masks.window is None \
        and masks.q_seg_BT is None
    if causal_alone and masks.q_offset >= req.S - 1:
        # Every query sees every key (one decoding step over a KV cache).
        mask, is_causal = None, False
    elif causal_alone and masks.q_offset == 0:
        # Top-left aligned like Keras; query padding is applied to the rows below.
        mask, is_causal = None, True
    else:
        mask, is_causal = masks.combined(req.T, req.S, req.q_BTNH.device, include_query=False), False
    if mask is not None and not _all_rows_live(masks):
        mask, keep = mask_with_live_rows(mask)
    k_BKSH, v_BKSH = req.k_BSNH.transpose(1, 2), req.v_BSNH.transpose(1, 2)
    gqa = {}
    if req.groups > 1:
        if _HAS_ENABLE_GQA:
            gqa = {"enable_gqa": True}
        else:
            k_BKSH, v_BKSH = (t.repeat_interleave(req.groups, dim=1) for t in (k_BKSH, v_BKSH))
    with _priority(req.q_BTNH.device, req.S, mask is not None):
        out_BNTH = F.scaled_dot_product_attention(
            req.q_BTNH.transpose(1, 2),
            k_BKSH,
            v_BKSH,
            attn_mask=mask,
            dropout_p=req.dropout_p,
            is_causal=is_causal,
            scale=req.scale,
            **gqa,
        )
    if masks.q_keep_BT is not None:
        q_keep = masks.q_keep_BT[:, :, None, None]
        keep = q_keep if keep is None else keep & q_keep
    return zero_rows(out_BNTH.transpose(1, 2), keep), None

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

On CUDA, torch chooses the kernel (flash, efficient, cuDNN or math, in the
order its version and the user's `torch.backends.cuda.enable_*_sdp` settings
give), and dist_mha only ever takes cuDNN away, for one call, in two cases:
- a mask tensor with `S % 128 == 64`: cuDNN's backward can return NaN in dq
  (torch 2.11+, H100/H200, when a row's logsumexp is below about -88.7:
  pytorch/pytorch#196678);
- dropout whose rate is not a multiple of 1/16: some cuDNN kernels resolve
  the rate only to 1/16 (0.1 runs as 0.0625 or 0.125, silently; torch stopped
  routing such calls to cuDNN after 2.11, pytorch/pytorch#174245).
Every other call runs with no context at all (entering `sdpa_kernel` costs
host time), and no backend the user disabled is ever re-enabled.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dist_mha.attention.blocks import CAUSAL
from dist_mha.attention.kernels.request import AttentionRequest, mask_with_live_rows, repeat_kv, zero_rows
from dist_mha.rng.streams import forked

NAME = "sdpa"
_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
# (torch flag name, backend) for every SDPA backend this torch has.
_FLAGS = [(n, getattr(SDPBackend, b)) for n, b in (("flash", "FLASH_ATTENTION"), ("mem_efficient", "EFFICIENT_ATTENTION"),
          ("math", "MATH"), ("cudnn", "CUDNN_ATTENTION"), ("overrideable", "OVERRIDEABLE"))
          if hasattr(SDPBackend, b) and hasattr(torch._C, f"_get_{n}_sdp_enabled")]


def cudnn_demoted(S: int, has_mask: bool, dropout_p: float) -> bool:
    """Whether a CUDA call with `S` keys, a mask tensor or not, and `dropout_p` must not run on cuDNN."""
    masked_s64 = has_mask and S % 128 == 64
    rounded_dropout = 0 < dropout_p and (16 * dropout_p) % 1 != 0
    return masked_s64 or rounded_dropout


def cuda_backends(S: int, has_mask: bool, dropout_p: float):
    """The SDPA backends to allow for one CUDA call, or None to leave torch's own choice alone.

    None unless cuDNN must be demoted (`cudnn_demoted`) and is enabled; then
    the backends enabled now, without cuDNN. When cuDNN is the only backend
    the user left enabled, that choice stands (None).
    """
    if not cudnn_demoted(S, has_mask, dropout_p):
        return None
    enabled = [b for n, b in _FLAGS if getattr(torch._C, f"_get_{n}_sdp_enabled")()]
    if SDPBackend.CUDNN_ATTENTION not in enabled or len(enabled) == 1:
        return None
    return [b for b in enabled if b != SDPBackend.CUDNN_ATTENTION]


def _backend_context(device, S, has_mask, dropout_p):
    if device.type != "cuda":
        return contextlib.nullcontext()
    backends = cuda_backends(S, has_mask, dropout_p)
    return contextlib.nullcontext() if backends is None else sdpa_kernel(backends)


def refusals(req: AttentionRequest) -> list[str]:
    """Why SDPA cannot serve `req` (empty when it can)."""
    reasons = []
    if req.need_scores:
        reasons.append("it does not return attention probabilities (return_attention_scores=True)")
    if req.dropout_p > 0 and req.dropout_keep is not None:
        reasons.append("TP-invariant dropout needs explicit masks, which only the math path applies")
    if req.softcap is not None:
        reasons.append("logit_softcap changes the scores inside the softmax, which SDPA does not take")
    return reasons


def _with_sink_column(mask, req, k_BKSH, v_BKSH, is_causal):
    """Sinks as one more key: zero key and value, its logit given by a float bias `(B|1, N, T|1, S + 1)`."""
    device, dtype = req.q_BTNH.device, req.q_BTNH.dtype
    if is_causal:
        mask = torch.ones(req.T, req.S, dtype=torch.bool, device=device).tril()[None, None]
    if mask is None:
        mask = torch.ones(1, 1, 1, req.S, dtype=torch.bool, device=device)
    bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
    B, T = bias.shape[0], bias.shape[2]
    sink = req.sinks.to(dtype).view(1, -1, 1, 1).expand(B, -1, T, 1)
    bias = torch.cat([bias.expand(B, sink.shape[1], T, -1), sink], dim=-1)
    k_BKSH, v_BKSH = (torch.nn.functional.pad(t, (0, 0, 0, 1)) for t in (k_BKSH, v_BKSH))
    return bias, k_BKSH, v_BKSH


def run(req: AttentionRequest):
    """Returns `(out_BTNH, None)`."""
    device = req.q_BTNH.device
    rel, mask = req.masks.block((0, req.T), (0, req.S), device)
    is_causal = rel.kind == CAUSAL
    if is_causal and mask is not None:  # SDPA takes a causal flag or a mask, not both
        mask, is_causal = mask & rel.mask(device), False
    keep = None
    if mask is not None:
        mask, keep = mask_with_live_rows(mask, req.T)
    k_BKSH, v_BKSH = req.k_BSNH.transpose(1, 2), req.v_BSNH.transpose(1, 2)
    if req.sinks is not None:
        mask, k_BKSH, v_BKSH = _with_sink_column(mask, req, k_BKSH, v_BKSH, is_causal)
        is_causal = False
    gqa = {}
    if req.groups > 1:
        if _HAS_ENABLE_GQA:
            gqa = {"enable_gqa": True}
        else:
            k_BKSH, v_BKSH = (repeat_kv(t, req.q_BTNH.shape[2]) for t in (k_BKSH, v_BKSH))
    with _backend_context(device, req.S, mask is not None, req.dropout_p), forked(req):
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
    if req.masks.q_keep_BT is not None:
        q_keep = req.masks.q_keep_BT[:, :, None, None]
        keep = q_keep if keep is None else keep & q_keep
    return zero_rows(out_BNTH.transpose(1, 2), keep), None

"""The flash-attn package: FA2 (`flash_attn`) or FA3 (`flash_attn_interface`).

Shape legend: B batch, T query positions, S key positions, N heads,
H head size, nnz number of unmasked keys in the batch.

Imported once, guarded: without the package (or without CUDA) this backend
refuses every input with the reason, and the dispatcher moves on. Key
padding runs through `flash_attn_varlen_func` on the unpadded keys; query
padding zeroes output rows afterwards.
"""

from __future__ import annotations

import torch

from dist_mha.core.kernels.request import AttentionRequest, zero_rows

NAME = "flash"

_IMPORT_ERRORS: list[str] = []
# A broken install (missing CUDA libraries, ABI mismatch) raises OSError or
# RuntimeError rather than ImportError; it must not break `import dist_mha`.
try:  # FA3 (Hopper) first: it is the faster kernel where it is installed.
    import flash_attn_interface as _fa3  # type: ignore
except ImportError:  # pragma: no cover - depends on the machine
    _fa3 = None
except Exception as err:  # pragma: no cover - depends on the machine
    _fa3 = None
    _IMPORT_ERRORS.append(f"flash_attn_interface failed to import ({type(err).__name__}: {err})")
try:
    import flash_attn as _fa2  # type: ignore
except ImportError:  # pragma: no cover - depends on the machine
    _fa2 = None
except Exception as err:  # pragma: no cover - depends on the machine
    _fa2 = None
    _IMPORT_ERRORS.append(f"flash_attn failed to import ({type(err).__name__}: {err})")

AVAILABLE = _fa3 is not None or _fa2 is not None


def refusals(req: AttentionRequest) -> list[str]:
    """Why flash-attn cannot serve `req` (empty when it can)."""
    reasons = []
    m = req.masks
    if not AVAILABLE:
        reasons.append("; ".join(_IMPORT_ERRORS)
                       or "the flash-attn package is not installed (pip install 'dist_mha[flash]' on a CUDA machine)")
    if req.q_BTNH.device.type != "cuda":
        reasons.append(f"inputs are on {req.q_BTNH.device.type}, flash-attn needs CUDA")
    if req.q_BTNH.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {req.q_BTNH.dtype} is not float16/bfloat16")
    if req.need_scores:
        reasons.append("it does not return attention probabilities (return_attention_scores=True)")
    if req.q_BTNH.shape[-1] != req.v_BSNH.shape[-1]:
        reasons.append(f"key_dim {req.q_BTNH.shape[-1]} != value_dim {req.v_BSNH.shape[-1]}")
    if req.q_BTNH.shape[-1] > 256:
        reasons.append(f"head size {req.q_BTNH.shape[-1]} > 256")
    if m.q_seg_BT is not None:
        reasons.append("segment ids (packed documents) need a dense mask here; flash-attn takes only causal and padding")
    if m.dense_BNTS is not None:
        reasons.append("an attention_mask (or a non-rank-3 layout) needs a dense (T, S) mask; flash-attn takes only causal and padding")
    if (m.causal or m.window is not None) and m.q_offset != req.S - req.T:
        reasons.append("flash-attn aligns causal/window masks bottom-right (query i at key i + S - T); this call "
                       f"puts query 0 at key {m.q_offset} (Keras: top-left), and S - T = {req.S - req.T}")
    if (m.causal or m.window is not None) and m.k_keep_BS is not None:
        reasons.append("causal/window with key padding would shift positions after unpadding")
    if req.dropout_p > 0 and _fa2 is None:
        reasons.append("dropout needs FA2; only FA3 (no dropout) is installed")
    if req.dropout_p > 0 and req.dropout_keep is not None:
        reasons.append("TP-invariant dropout needs explicit masks, which only the math path applies")
    return reasons


def _dense(q, k, v, req, causal, window):
    if _fa3 is not None and req.dropout_p == 0:
        out = _fa3.flash_attn_func(q, k, v, softmax_scale=req.scale, causal=causal, window_size=window)
        return out[0] if isinstance(out, tuple) else out
    return _fa2.flash_attn_func(q, k, v, dropout_p=req.dropout_p, softmax_scale=req.scale, causal=causal, window_size=window)


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, req, causal, window):
    if _fa3 is not None and req.dropout_p == 0:
        out = _fa3.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=req.scale, causal=causal, window_size=window
        )
        return out[0] if isinstance(out, tuple) else out
    return _fa2.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=req.dropout_p, softmax_scale=req.scale, causal=causal, window_size=window
    )


def run(req: AttentionRequest):
    """Returns `(out_BTNH, None)`."""
    m = req.masks
    window = (-1, -1) if m.window is None else (m.window - 1, m.window - 1)
    q, k, v = (t.contiguous() for t in (req.q_BTNH, req.k_BSNH, req.v_BSNH))
    keep = None if m.q_keep_BT is None else m.q_keep_BT[:, :, None, None]
    if m.k_keep_BS is None:
        return zero_rows(_dense(q, k, v, req, m.causal, window), keep), None

    B, T, N, H = q.shape
    K = k.shape[2]  # key/value heads: flash-attn reads grouped K/V natively
    k_keep = m.k_keep_BS
    live_B = k_keep.any(dim=1)
    # A batch row with no key at all would give flash-attn a zero-length
    # sequence; let it see key 0 and zero its output instead.
    k_keep = k_keep.clone()
    k_keep[:, 0] |= ~live_B
    live = live_B[:, None, None, None]
    keep = live if keep is None else keep & live
    seqlens_k = k_keep.sum(dim=1, dtype=torch.int32)
    cu_k = torch.nn.functional.pad(seqlens_k.cumsum(0, dtype=torch.int32), (1, 0))
    idx = k_keep.flatten().nonzero().flatten()
    k_nnz = k.reshape(-1, K, H).index_select(0, idx)
    v_nnz = v.reshape(-1, K, v.shape[-1]).index_select(0, idx)
    cu_q = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    out = _varlen(
        q.reshape(B * T, N, H), k_nnz, v_nnz, cu_q, cu_k, T, int(seqlens_k.max()), req, m.causal, window
    )
    return zero_rows(out.reshape(B, T, N, -1), keep), None

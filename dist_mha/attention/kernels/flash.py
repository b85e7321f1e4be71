"""The flash-attn kernels: FA3, FA4 or FA2, whichever is installed and takes the call.

Shape legend: B batch, T query positions, S key positions, N query heads,
K key/value heads, H head size, nnz number of kept keys in the batch.

The builds are found once, at import (`flash_variants.load`); without one
(or without CUDA) this backend refuses every input with the reason, and the
dispatcher moves on. Key padding runs through `flash_attn_varlen_func` on the
unpadded keys (the kept-key indices are read on the host once per distinct
mask, `mask_cache`); query padding zeroes output rows afterwards. flash-attn
reads any q/k/v whose last dim is contiguous, so nothing is copied to make
them so.

`input_refusals` is the one statement of what a CUDA flash kernel takes; the
ring's blocks (torch's own flash kernels, `blockwise.py`) ask it too, with
`torch_flash_refusals`.
"""

from __future__ import annotations

import torch

from dist_mha.attention import rotary
from dist_mha.attention.blocks import FULL
from dist_mha.attention.kernels import flash_variants, mask_cache
from dist_mha.attention.kernels.request import AttentionRequest, rows_BTN1, zero_rows
from dist_mha.attention.masks import live_rows
from dist_mha.rng.streams import forked

NAME = "flash"

VARIANTS: list = []
AVAILABLE = False
_ABSENT: list[str] = []
_UNUSABLE: list[str] = []


def reload() -> None:
    """Looks for the flash-attn builds again (after an install, or in tests)."""
    global VARIANTS, AVAILABLE, _ABSENT, _UNUSABLE
    VARIANTS, _ABSENT, _UNUSABLE = flash_variants.load()
    AVAILABLE = bool(VARIANTS)
    rotary.forget_flash_rotary()


reload()

_CAPABILITY: dict[int, tuple[int, int]] = {}


def _is_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of `device` (cached: it is read on every call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def _not_installed() -> str:
    if _UNUSABLE:
        return "; ".join(_UNUSABLE)
    return (f"flash-attn is not installed (none of {', '.join(_ABSENT)} is importable; "
            "pip install 'dist_mha[flash]' on a CUDA machine)")


def input_refusals(q, v) -> list[str]:
    """Why a CUDA flash kernel (flash-attn's or torch's) cannot take queries `q` and values `v`."""
    reasons = []
    if not _is_cuda(q):
        reasons.append(f"inputs are on {q.device.type}, flash kernels need CUDA")
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {q.dtype} is not float16/bfloat16")
    if q.shape[-1] != v.shape[-1]:
        reasons.append(f"key_dim {q.shape[-1]} != value_dim {v.shape[-1]}")
    if q.shape[-1] > 256:
        reasons.append(f"head size {q.shape[-1]} > 256")
    return reasons


def torch_flash_refusals(q, v, flash_attention=None) -> list[str]:
    """Why torch's own CUDA flash kernel (the ring's blocks) cannot take `q`, `v`."""
    reasons = input_refusals(q, v)
    if flash_attention is False:
        reasons.append("flash_attention=False")
    if reasons:
        return reasons
    if q.shape[-1] % 8:
        reasons.append(f"head size {q.shape[-1]} is not a multiple of 8")
    major, minor = _capability(q.device)
    if major < 8:
        reasons.append(f"needs compute capability 8.0 or newer (this GPU: {major}.{minor})")
    if not torch.backends.cuda.flash_sdp_enabled():
        reasons.append("torch's flash kernel is disabled (torch.backends.cuda.enable_flash_sdp(False))")
    return reasons


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (host reads would be replayed stale)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _common_refusals(req: AttentionRequest) -> list[str]:
    m = req.masks
    reasons = input_refusals(req.q_BTNH, req.v_BSNH)
    if req.need_scores:
        reasons.append("it does not return attention probabilities (return_attention_scores=True)")
    if m.q_seg_BT is not None:
        reasons.append("segment ids (packed documents) need a dense mask here; flash-attn takes only causal and padding")
    if m.dense_BNTS is not None:
        reasons.append("an attention_mask (or a non-rank-3 layout) needs a dense (T, S) mask; flash-attn takes only causal and padding")
    rel = m.relation((0, req.T), (0, req.S))
    if (m.causal or m.window is not None) and not rel.bottom_right and rel.kind != FULL:
        reasons.append("flash-attn aligns causal/window masks bottom-right (query i at key i + S - T); this call "
                       f"puts query 0 at key {m.q_offset} (Keras: top-left), and S - T = {req.S - req.T}")
    if (m.causal or m.window is not None) and m.k_keep_BS is not None:
        reasons.append("causal/window with key padding would shift positions after unpadding")
    if m.k_keep_BS is not None and capturing():
        reasons.append("key padding is unpadded with indices read on the host, which a captured CUDA graph "
                       "would replay stale (pass no value_mask inside the capture, or capture SDPA)")
    if req.dropout_p > 0 and req.dropout_keep is not None:
        reasons.append("TP-invariant dropout needs explicit masks, which only the math path applies")
    return reasons


def _variant_refusals(variant, req: AttentionRequest, capability) -> list[str]:
    """Why one installed build cannot serve `req`."""
    reasons = []
    H = req.q_BTNH.shape[-1]
    major = capability[0]
    if variant.name == "FA2" and major < 8:
        reasons.append(f"needs compute capability 8.0 or newer (this GPU: {major}.{capability[1]})")
    if variant.name == "FA3" and major != 9:
        reasons.append(f"runs on Hopper (compute capability 9.x) only (this GPU: {major}.{capability[1]})")
    if variant.name == "FA4" and major not in (9, 10):
        reasons.append(f"runs on Hopper and Blackwell (compute capability 9.x, 10.x) only (this GPU: {major}.{capability[1]})")
    if variant.name in ("FA3", "FA4") and H % 8:
        reasons.append(f"head size {H} is not a multiple of 8")
    if variant.name == "FA4" and major == 10 and H > 128:
        reasons.append(f"head size {H} > 128 on Blackwell")
    if req.dropout_p > 0 and not variant.dropout:
        reasons.append("it has no dropout (only FA2 has)")
    if req.masks.window is not None and not variant.window:
        reasons.append("this build takes no window_size")
    if req.softcap is not None and not variant.takes("softcap"):
        reasons.append("this build takes no softcap")
    if req.sinks is not None and not variant.takes("learnable_sink"):
        reasons.append("this build takes no learnable_sink (attention sinks)")
    return reasons


def choose(req: AttentionRequest):
    """`(variant, reasons)`: the first installed build that takes `req`, else None and why not."""
    reasons = _common_refusals(req)
    if not VARIANTS:
        return None, reasons + [_not_installed()]
    if reasons:
        return None, reasons
    capability = _capability(req.q_BTNH.device)
    per_variant = []
    for variant in VARIANTS:
        why = _variant_refusals(variant, req, capability)
        if not why:
            return variant, []
        per_variant.append(f"{variant.name} ({variant.module}): {', '.join(why)}")
    if req.dropout_p > 0 and "flash_attn" in _ABSENT:
        per_variant.append("FA2 (flash_attn), the only build with dropout, is not installed")
    return None, ["; ".join(per_variant + _UNUSABLE)]


def refusals(req: AttentionRequest) -> list[str]:
    """Why flash-attn cannot serve `req` (empty when it can)."""
    return choose(req)[1]


def ranks_after_sdpa(req: AttentionRequest) -> bool:
    """Whether SDPA should be tried before flash-attn for `req`.

    On sm90 and newer, FA2 is slower than SDPA's cuDNN kernel (1.7-1.8x on an
    H100, bf16, head size 128); FA2 keeps the lead only where SDPA pays for
    what flash does natively: key padding (varlen, no (B, 1, 1, S) mask) and
    dropout (cuDNN resolves some rates only to 1/16, see sdpa.py).
    """
    variant, _ = choose(req)
    if variant is None or variant.name != "FA2":
        return False
    if req.masks.k_keep_BS is not None or req.dropout_p > 0:
        return False
    return _capability(req.q_BTNH.device)[0] >= 9


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _unpad_plan(k_keep_BS: torch.Tensor):
    """`(cu_seqlens_k (B+1,) int32, kept key indices (nnz,), live rows (B, 1, 1))`, made once per mask.

    A batch row with no key at all would give flash-attn a zero-length
    sequence; it sees key 0 instead and its output is zeroed.
    """
    live_B11 = live_rows(k_keep_BS[:, None, None, :], 1)
    k_keep = k_keep_BS.clone()
    k_keep[:, 0] |= ~live_B11[:, 0, 0]
    cu_k = torch.nn.functional.pad(k_keep.sum(dim=1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return cu_k, k_keep.flatten().nonzero().flatten(), live_B11


def run(req: AttentionRequest):
    """Returns `(out_BTNH, None)`."""
    variant, reasons = choose(req)
    if variant is None:
        raise ValueError(f"flash-attn cannot serve this call: {', '.join(reasons)}")
    m = req.masks
    rel = m.relation((0, req.T), (0, req.S))
    kwargs = dict(softmax_scale=req.scale, causal=m.causal and rel.kind != FULL)
    if req.dropout_p > 0:
        kwargs["dropout_p"] = req.dropout_p
    if m.window is not None and rel.kind != FULL:
        kwargs["window_size"] = (m.window - 1, m.window - 1)
    if req.softcap is not None:
        kwargs["softcap"] = req.softcap
    if req.sinks is not None:
        kwargs["learnable_sink"] = req.sinks.float()
    q, k, v = (_last_dim_contiguous(t) for t in (req.q_BTNH, req.k_BSNH, req.v_BSNH))
    keep = None if m.q_keep_BT is None else m.q_keep_BT[:, :, None, None]
    if m.k_keep_BS is None:
        with forked(req):  # flash-attn draws dropout from the default CUDA generator
            out = variant.call_dense(q, k, v, **kwargs)
        return zero_rows(out, keep), None

    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]  # K key/value heads: flash-attn reads grouped K/V natively
    cu_k, idx, live_B11 = mask_cache.cached("flash_unpad", (m.k_keep_BS,), (), lambda: _unpad_plan(m.k_keep_BS))
    live = rows_BTN1(live_B11)
    keep = live if keep is None else keep & live
    k_nnz = k.reshape(B * S, K, H).index_select(0, idx)
    v_nnz = v.reshape(B * S, K, v.shape[-1]).index_select(0, idx)
    cu_q = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    # max_seqlen_k only sizes the kernel's grid: S bounds it without reading
    # the lengths back from the GPU.
    with forked(req):
        out = variant.call_varlen(
            q.reshape(B * T, N, H), k_nnz, v_nnz, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=T,
            max_seqlen_k=S, **kwargs,
        )
    return zero_rows(out.reshape(B, T, N, -1), keep), None

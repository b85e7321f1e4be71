"""dist_mha's kernels as a Hugging Face `transformers` attention backend.

Shape legend: B batch, N query heads, K key/value heads, T query positions,
S key positions, H head size.

`register()` adds `"dist_mha"` to `transformers.AttentionInterface` and to
`AttentionMaskInterface`, so an unmodified HF model built or loaded with
`attn_implementation="dist_mha"` runs its attention on dist_mha's dispatcher
(flash-attn, varlen, SDPA or math, whichever takes the call first).

Masks: HF builds one mask per forward (and layer type) through the mask
interface; without an entry there, a custom backend gets `attention_mask=None`
and silently loses sliding windows, packing and padding. Ours asks HF's own
`sdpa_mask` for the exact boolean mask, then re-expresses it as a `MaskSpec`
(causal, window, key padding, packed documents read off `position_ids` the
way HF does) when that spec gives exactly the same mask; only then can the
varlen kernel run per document. A mask it cannot express (custom mask
functions, prefix tuning) is passed on as the dense mask, so the result is
HF's mask either way. The check runs once per mask tensor (the layers of a
forward share it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dist_mha.attention.kernels import AttentionRequest, attention
from dist_mha.attention.masks import MaskSpec

NAME = "dist_mha"
_RESERVED = ("sdpa", "flash", "flex", "eager", "paged")  # transformers treats names containing these specially


@dataclass
class HFMask:
    """What our mask interface hands each attention call: HF's exact mask and what it was made from.

    Attributes:
        dense_B1TS: HF's boolean mask `(B, 1, T, S)` (True attends), or None
            where HF's SDPA path uses its `is_causal` flag (or no mask).
        padding_BS: the 2-D padding mask over this call's keys, or None.
        q_offset, kv_offset: positions of the first query and of the first key.
    """

    dense_B1TS: torch.Tensor | None
    padding_BS: torch.Tensor | None
    q_offset: int
    kv_offset: int
    structured: dict = dataclasses.field(default_factory=dict)  # (window, causal, positions) -> MaskSpec | None


def _mask_interface(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask

    dense = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                      kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding[:, kv_offset:kv_offset + kv_length]
    return HFMask(dense, padding, int(q_offset), int(kv_offset))


def _documents(position_ids, batch: int):
    """HF's packing rule: a position step other than +1 starts a document; `(B, T)` ids or None (one document)."""
    pos = position_ids.expand(batch, -1)
    step = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
    ids = (step != 1).cumsum(-1)
    return ids if bool((ids[:, -1] != 0).any()) else None


def _spec(mask, T: int, S: int, B: int, causal: bool, window, position_ids, device) -> MaskSpec:
    """The `MaskSpec` equal to HF's mask for this call."""
    if mask is None:  # no mask interface entry ran (a 4-D mask given by the caller is a tensor, below)
        return MaskSpec(causal=causal and T > 1)
    if isinstance(mask, torch.Tensor):  # a ready 4-D mask from the caller
        keep = mask if mask.dtype == torch.bool else mask == 0
        return MaskSpec(dense_BNTS=keep)
    if mask.dense_B1TS is None:
        # HF's SDPA would run with is_causal = T > 1 (top-left aligned) and no mask.
        return MaskSpec(causal=causal and T > 1)
    key = (window, causal, None if position_ids is None else id(position_ids))
    if key not in mask.structured:
        mask.structured[key] = _structured(mask, T, S, B, causal, window, position_ids, device)
    return mask.structured[key] or MaskSpec(dense_BNTS=mask.dense_B1TS)


def _structured(mask: HFMask, T, S, B, causal, window, position_ids, device):
    """Causal/window/padding/documents equal to `mask.dense_B1TS`, or None when they are not.

    Documents are tried first, then none: transformers reads packing off
    `position_ids` only without a cache and a 2-D mask, which this function
    cannot see, so the comparison with HF's own mask decides.
    """
    if not causal and window is not None:
        return None
    base = MaskSpec(causal=causal, window=window if causal else None, q_offset=mask.q_offset - mask.kv_offset)
    if mask.padding_BS is not None and not bool(mask.padding_BS.all()):
        base.k_keep_BS = mask.padding_BS.to(device=device, dtype=torch.bool)
    candidates = [base]
    if position_ids is not None and T == S and mask.q_offset == 0 and mask.kv_offset == 0:
        docs = _documents(position_ids.to(device), B)
        if docs is not None:
            candidates.insert(0, dataclasses.replace(base, q_seg_BT=docs, k_seg_BS=docs))
    dense = mask.dense_B1TS
    for spec in candidates:
        full = spec.combined(T, S, device, include_query=False)
        if bool(dense.all()) if full is None else torch.equal(full.expand(dense.shape), dense):
            return spec
    return None


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      _backend=None, _flash=None, **kwargs):
    """`transformers`' attention-function contract, served by dist_mha's kernels.

    Args:
        module: the HF attention module (`is_causal`, `sliding_window`, `head_dim` are read from it).
        query: `(B, N, T, H)`, rotary positions applied.
        key, value: `(B, K, S, H)`, not repeated to N heads (grouped K/V are read in place).
        attention_mask: what our mask interface returned (`HFMask`), a 4-D mask, or None.
        dropout, scaling: attention dropout rate and logit scale (None: `H ** -0.5`).
        **kwargs: `sliding_window`, `position_ids`, `softcap` (Gemma2), ... as the model
            passes them; a module's `sinks` (gpt-oss) join the softmax.

    Returns:
        `(out (B, T, N, H), None)`.

    Raises:
        ValueError: when the forced kernel cannot serve the call (every kernel's reasons listed).
    """
    B, _, T, H = query.shape
    S = key.shape[2]
    sinks = getattr(module, "sinks", None)  # gpt-oss: one learned logit per query head, joining the softmax
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    spec = _spec(attention_mask, T, S, B, bool(causal), window, kwargs.get("position_ids"), query.device)
    softcap = kwargs.get("softcap")
    req = AttentionRequest(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), spec,
                           H ** -0.5 if scaling is None else float(scaling),
                           dropout_p=float(dropout) if module.training else 0.0,
                           softcap=None if softcap is None else float(softcap), sinks=sinks)
    out_BTNH, _, backend, why = attention(req, _flash, _backend)
    module.__dict__["dist_mha_backend"] = backend  # which kernel ran (a plain attribute, no module bookkeeping)
    module.__dict__["dist_mha_backend_reason"] = why
    return out_BTNH, None


def register(name: str = NAME, *, attention_backend: str | None = None, flash_attention=None) -> str:
    """Adds dist_mha's kernels to `transformers` as attention implementation `name`.

    Args:
        name: the `attn_implementation` name; must not contain "sdpa", "flash",
            "flex", "eager" or "paged" (transformers gives those names special handling).
        attention_backend: force one dist_mha kernel ("flash", "varlen", "sdpa",
            "math"); None lets the dispatcher choose per call.
        flash_attention: as in `MultiHeadAttention` (None: fastest available).

    Returns:
        `name`.

    Raises:
        ValueError: for a reserved `name` or an unknown `attention_backend`.
        ImportError: when `transformers` is not installed.

    Example:

    >>> from dist_mha.integrations import hf
    >>> hf.register()
    >>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="dist_mha")
    >>> model.model.layers[0].self_attn.dist_mha_backend   # after a forward: "sdpa", "varlen", ...
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    from dist_mha.attention.kernels import BACKENDS

    if not isinstance(name, str) or not name or any(r in name for r in _RESERVED):
        raise ValueError(f"Received an invalid value for argument `name`, expected a non-empty string without any of "
                         f"{_RESERVED} (transformers treats those names specially). Received: name={name!r}")
    if attention_backend is not None and attention_backend not in BACKENDS:
        raise ValueError(f"Received an invalid value for argument `attention_backend`, expected None or one of "
                         f"{sorted(BACKENDS)}. Received: attention_backend={attention_backend!r}")

    def forward(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, _backend=attention_backend,
                                 _flash=flash_attention, **kwargs)

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, _mask_interface)
    return name

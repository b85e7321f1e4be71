"""Blockwise attention for ring context parallelism: one (query block, key block) at a time.

Shape legend: B batch, t query rows of a block, s key rows of a block, n query
heads, k key/value heads (n % k == 0), H / Hv head sizes. Tensors cross this
module as `*_BNTH` (heads before positions, as the kernels want them);
`lse_BNT` is float32 (float64 for float64 inputs).

`forward` returns the block's output normalised over the block's keys and the
block's log-sum-exp `lse_b`; partial results merge exactly (`merge`). The
backward of block b needs the *final* output `O` and log-sum-exp `L` of the
query rows (`P_b = exp(S_b - L)` are then the final probabilities, and
`dS_b = P_b * (dP_b - rowsum(dO * O))`), so `backward` takes them.

Kernels (`choose` picks them once per call, `Kernels` holds the choice):
- "cpu_flash": torch's CPU flash kernels (`_scaled_dot_product_flash_attention_for_cpu`
  and its backward, which take `out` and `logsumexp`): grouped K/V in place,
  masks as an additive bias. No dropout, `H == Hv`.
- "cuda_flash": torch's CUDA flash kernels (`_scaled_dot_product_flash_attention`
  and its backward, as torch's own context parallelism drives them) for
  blocks without a mask (every block of causal attention without padding:
  full or diagonal). fp16/bf16, head size a multiple of 8 up to 256, sm80+.
- "cuda_efficient": torch's CUDA memory-efficient kernels
  (`_scaled_dot_product_efficient_attention` and its backward) for masked
  blocks: the mask travels as an additive bias (broadcast views: key padding
  costs a `(B, 1, 1, s)` bias, not `(B, n, t, s)`), the LSE comes back padded
  to 32 rows and goes back the same way.
- "math": explicit scores, any device and dtype, grouped K/V repeated, and
  dropout with a given keep-mask (counter-based, so the backward sees the
  forward's mask without storing it).
Every kernel reports rows with no visible key as `lse = -inf` and a zero
output, and runs with autocast off: the backward recomputes against the
forward's LSE, so both must see the same (>= float32) scores.

The private ATen ops are called through `OPS`, the one table of them, so a
CPU test can check what each receives (contiguity, dtypes, shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from dist_mha.attention.kernels import flash
from dist_mha.attention.kernels.request import repeat_kv, softcapped
from dist_mha.attention.masks import live_rows

_NEG_INF = float("-inf")
_LSE_ALIGN = 32  # rows the CUDA memory-efficient kernel pads its LSE to
_BIAS_ALIGN = 16  # elements the memory-efficient kernel wants a bias row's stride aligned to

OPS = SimpleNamespace(
    cpu_flash=lambda *a, **k: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*a, **k),
    cpu_flash_backward=lambda *a, **k: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*a, **k),
    cuda_flash=lambda *a, **k: torch.ops.aten._scaled_dot_product_flash_attention(*a, **k),
    cuda_flash_backward=lambda *a, **k: torch.ops.aten._scaled_dot_product_flash_attention_backward(*a, **k),
    cuda_efficient=lambda *a, **k: torch.ops.aten._scaled_dot_product_efficient_attention(*a, **k),
    cuda_efficient_backward=lambda *a, **k: torch.ops.aten._scaled_dot_product_efficient_attention_backward(*a, **k),
)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Kernels:
    """The kernels of one ring call: for blocks without a mask, for masked blocks, and why."""

    unmasked: str
    masked: str
    why: str

    def for_mask(self, mask) -> str:
        return self.unmasked if mask is None else self.masked


def _efficient_refusals(q, v) -> list[str]:
    reasons = []
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {q.dtype}: the memory-efficient kernel takes float16/bfloat16/float32")
    if q.shape[-1] % 8 or v.shape[-1] % 8:
        reasons.append(f"head sizes {q.shape[-1]}/{v.shape[-1]}: the memory-efficient kernel takes multiples of 8")
    if not torch.backends.cuda.mem_efficient_sdp_enabled():  # the user's switch for this kernel
        reasons.append("torch's memory-efficient kernel is disabled")
    return reasons


def choose(q_BNTH, v_BKSH, dropout: bool, forced: str | None, flash_attention=None, softcap=None) -> Kernels:
    """The `Kernels` for the blocks of one ring call."""
    device = "cuda" if flash._is_cuda(q_BNTH) else q_BNTH.device.type
    common = []
    if dropout:
        common.append("dropout masks must be replayed in the backward (the math blocks take them explicitly)")
    if softcap is not None:
        common.append("logit_softcap changes the scores inside the softmax (the math blocks apply it)")
    if forced == "math":
        common.append("attention_backend='math'")
    if device == "cuda":
        flash_no = common + flash.torch_flash_refusals(q_BNTH, v_BKSH, flash_attention)
        eff_no = common + _efficient_refusals(q_BNTH, v_BKSH)
        unmasked = "cuda_flash" if not flash_no else "cuda_efficient" if not eff_no else "math"
        masked = "cuda_efficient" if not eff_no else "math"
        why = (f"ring blocks without a mask on {unmasked}" + (f" (flash: {'; '.join(flash_no)})" if flash_no else "")
               + f", masked blocks on {masked}" + (f" (memory-efficient: {'; '.join(eff_no)})" if eff_no else ""))
        return Kernels(unmasked, masked, why)
    reasons = list(common)
    if device != "cpu":
        reasons.append(f"inputs on {device}: the LSE-returning SDPA ops are wired for CPU and CUDA")
    if q_BNTH.shape[-1] != v_BKSH.shape[-1]:
        reasons.append(f"key_dim {q_BNTH.shape[-1]} != value_dim {v_BKSH.shape[-1]}")
    if reasons:
        return Kernels("math", "math", "ring blocks on math: " + "; ".join(reasons))
    return Kernels("cpu_flash", "cpu_flash", "ring blocks on SDPA's CPU flash kernel (LSE returned, backward given "
                                             "the merged LSE)")


def _bias(mask, dtype, align: int = 1):
    """Additive bias (0 / -inf) of a bool mask; rows `align`-strided (views of a padded buffer) when asked."""
    if mask is None:
        return None
    s = mask.shape[-1]
    width = -(-s // align) * align
    bias = torch.zeros((*mask.shape[:-1], width), dtype=dtype, device=mask.device)
    bias[..., :s].masked_fill_(~mask, _NEG_INF)
    return bias[..., :s]


def _with_causal(mask, is_causal, t, s, device):
    """The math blocks build the diagonal block's causal mask the kernels take as a flag."""
    if not is_causal:
        return mask
    causal = torch.ones(t, s, dtype=torch.bool, device=device).tril()
    return causal if mask is None else mask & causal


def _opened(mask, t, is_causal):
    """`(mask with fully masked rows opened, live rows (B|1, N|1, t) or None)` for the bias kernels."""
    live = live_rows(mask, t, is_causal)
    if live is None:
        return None, None
    return mask | ~live[..., None], live


def forward(kernels: Kernels, q_BNTH, k_BKSH, v_BKSH, mask, scale, keep=None, rate=0.0, is_causal=False, state=None,
            softcap=None):
    """One block: `(out_BNTH normalised over this block, lse_BNT)`.

    Args:
        kernels: from `choose`.
        mask: bool, broadcastable to `(B, n, t, s)`, True to attend; None: every key.
        keep: dropout keep-mask `(B, n, t, s)` (math only), applied with `1 / (1 - rate)`.
        is_causal: top-left causal on top of `mask` (a diagonal block; no positional mask is built).
        state: a dict that keeps what the CUDA backward ops need besides
            the merged output and LSE (their placeholder arguments).
    """
    impl = kernels.for_mask(mask)
    t, acc = q_BNTH.shape[2], lse_dtype(q_BNTH.dtype)
    with torch.autocast(q_BNTH.device.type, enabled=False):
        if impl == "cuda_flash":
            out, lse, *rest = OPS.cuda_flash(q_BNTH, k_BKSH, v_BKSH, dropout_p=0.0, is_causal=is_causal,
                                             return_debug_mask=False, scale=scale)
            if state is not None:
                state.setdefault("flash_rest", rest[:6])  # cum_seq_q, cum_seq_k, max_q, max_k, philox seed, offset
            return out, lse.float()
        if impl in ("cpu_flash", "cuda_efficient"):
            if impl == "cuda_efficient":
                mask, is_causal = _with_causal(mask, is_causal, t, k_BKSH.shape[2], q_BNTH.device), False
            opened, live = _opened(mask, t, is_causal)
            if impl == "cpu_flash":
                out, lse = OPS.cpu_flash(q_BNTH, k_BKSH, v_BKSH, is_causal=is_causal,
                                         attn_mask=_bias(opened, q_BNTH.dtype), scale=scale)
            else:  # the causal flag is folded into the bias (the diagonal block's (t, s) mask only)
                B, n, s = q_BNTH.shape[0], q_BNTH.shape[1], k_BKSH.shape[2]
                bias = _bias(opened, q_BNTH.dtype, _BIAS_ALIGN).expand(B, n, t, s)
                out, lse, seed, offset = OPS.cuda_efficient(
                    q_BNTH, repeat_kv(k_BKSH, n), repeat_kv(v_BKSH, n), bias, True, 0.0, False, scale=scale)
                if state is not None:
                    state.setdefault("efficient_rest", (seed, offset))
                lse = lse[..., :t]
            if live is not None:
                # Rows with no visible key: the kernel computed something finite over the opened mask;
                # merging needs lse = -inf and a zero output there.
                lse = lse.masked_fill(~live, _NEG_INF)
                out = out.masked_fill(~live[..., None], 0)
            return out, lse.to(acc)
        n = q_BNTH.shape[1]
        s_BNTS = _scores(q_BNTH, k_BKSH, _with_causal(mask, is_causal, t, k_BKSH.shape[2], q_BNTH.device), scale,
                         softcap)
        lse = torch.logsumexp(s_BNTS, dim=-1)
        p = torch.exp(s_BNTS - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
        if keep is not None:
            p = p * keep / (1.0 - rate)
        return torch.matmul(p, repeat_kv(v_BKSH, n).to(acc)), lse


def _raw_scores(q_BNTH, k_BKSH, scale):
    """`(B, n, t, s)` scaled scores, float32 at least (Keras scales the query first)."""
    acc = lse_dtype(q_BNTH.dtype)
    return torch.matmul((q_BNTH * scale).to(acc), repeat_kv(k_BKSH, q_BNTH.shape[1]).to(acc).transpose(-1, -2))


def _scores(q_BNTH, k_BKSH, mask, scale, softcap=None, raw=None):
    """The scores the softmax sees: scaled, soft-capped, masked with -inf."""
    s = softcapped(_raw_scores(q_BNTH, k_BKSH, scale) if raw is None else raw, softcap)
    return s if mask is None else s.masked_fill(~mask, _NEG_INF)


def _fold(dx_BNSH, k):
    """Sums the gradients of repeated key/value heads back to k heads."""
    B, n, s, h = dx_BNSH.shape
    return dx_BNSH if n == k else dx_BNSH.view(B, k, n // k, s, h).sum(dim=2)


def _padded_lse(L_BNT):
    """The merged LSE laid out as the memory-efficient kernel wrote its own: float32, rows padded to 32."""
    t = L_BNT.shape[-1]
    out = L_BNT.new_zeros((*L_BNT.shape[:-1], -(-t // _LSE_ALIGN) * _LSE_ALIGN), dtype=torch.float32)
    out[..., :t] = L_BNT
    return out


def backward(kernels: Kernels, dO_BNTH, q_BNTH, k_BKSH, v_BKSH, O_BNTH, L_BNT, D_BNT, mask, scale, keep=None,
             rate=0.0, is_causal=False, state=None, softcap=None):
    """Gradients of one block `(dq_BNTH, dk_BKSH, dv_BKSH)` from the final `O`, `L` and `D = rowsum(dO * O)`.

    Rows with `L = -inf` (nothing visible anywhere) must come with `dO = 0`
    and a finite `L` (the caller substitutes 0): their gradient is zero.
    `O`, `dO`, `L` and `D` may be chunks (views) of the whole call's: the
    kernels read the LSE as a dense buffer, so it is made contiguous here.
    """
    impl = kernels.for_mask(mask)
    n, k, t = q_BNTH.shape[1], k_BKSH.shape[1], q_BNTH.shape[2]
    acc = lse_dtype(q_BNTH.dtype)
    with torch.autocast(q_BNTH.device.type, enabled=False):
        if impl == "cuda_flash":
            cum_q, cum_k, max_q, max_k, seed, offset = state["flash_rest"]
            return OPS.cuda_flash_backward(
                dO_BNTH, q_BNTH, k_BKSH, v_BKSH, O_BNTH, L_BNT.float().contiguous(), cum_q, cum_k, max_q, max_k, 0.0,
                is_causal, seed, offset, scale=scale)
        # The backward takes the mask as it is: a row with no key here but some in another block has a
        # finite L, so exp(-inf - L) = 0 keeps this block's masked keys out of its gradient.
        if impl == "cpu_flash":
            return OPS.cpu_flash_backward(dO_BNTH, q_BNTH, k_BKSH, v_BKSH, O_BNTH, L_BNT.to(acc).contiguous(), 0.0,
                                          is_causal, attn_mask=_bias(mask, q_BNTH.dtype), scale=scale)
        if impl == "cuda_efficient":
            mask, is_causal = _with_causal(mask, is_causal, t, k_BKSH.shape[2], q_BNTH.device), False
            B, s = q_BNTH.shape[0], k_BKSH.shape[2]
            bias = _bias(mask, q_BNTH.dtype, _BIAS_ALIGN).expand(B, n, t, s)
            seed, offset = state["efficient_rest"]
            dq, dk, dv, _ = OPS.cuda_efficient_backward(
                dO_BNTH, q_BNTH, repeat_kv(k_BKSH, n), repeat_kv(v_BKSH, n), bias, O_BNTH, _padded_lse(L_BNT), seed,
                offset, 0.0, [True, True, True, False], is_causal, scale=scale)
            return dq, _fold(dk, k), _fold(dv, k)
        mask = _with_causal(mask, is_causal, t, k_BKSH.shape[2], q_BNTH.device)
        raw = _raw_scores(q_BNTH, k_BKSH, scale)
        p = torch.exp(_scores(q_BNTH, k_BKSH, mask, scale, softcap, raw) - L_BNT[..., None])  # the final probabilities
        v = repeat_kv(v_BKSH, n).to(acc)
        dO = dO_BNTH.to(acc)
        z = p if keep is None else p * keep / (1.0 - rate)
        dv = torch.matmul(z.transpose(-1, -2), dO)
        dp = torch.matmul(dO, v.transpose(-1, -2))
        if keep is not None:
            dp = dp * keep / (1.0 - rate)
        ds = p * (dp - D_BNT[..., None].to(acc))
        if softcap is not None:
            ds = ds * (1 - torch.tanh(raw / softcap).square())  # d(c tanh(s / c)) / ds
        dq = torch.matmul(ds, repeat_kv(k_BKSH, n).to(acc)) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q_BNTH.to(acc)) * scale
        return dq.to(q_BNTH.dtype), _fold(dk, k).to(k_BKSH.dtype), _fold(dv, k).to(v_BKSH.dtype)


def merge(out_acc, lse_acc, out_b, lse_b):
    """Exact combination of two partial attentions over disjoint key sets: `(out, lse)`.

    `out_*` are `(B, n, t, Hv)` normalised over their own keys; rows where
    both `lse` are -inf stay zero with `lse = -inf`. Accumulates in the LSE's
    dtype (float32 or wider).
    """
    if out_acc is None:
        return out_b.to(lse_b.dtype) if out_b.dtype != lse_b.dtype else out_b, lse_b
    m = torch.maximum(lse_acc, lse_b)
    m_safe = m.masked_fill(torch.isinf(m), 0.0)
    w_a, w_b = torch.exp(lse_acc - m_safe), torch.exp(lse_b - m_safe)
    total = w_a + w_b
    denom = total.masked_fill(total == 0, 1.0)
    out = (out_acc * w_a[..., None] + out_b.to(out_acc.dtype) * w_b[..., None]) / denom[..., None]
    return out, m_safe + torch.log(total)


def add_sinks(O_BNTH, L_BNT, sinks_n):
    """The merged attention with each head's sink logit joined to every row's denominator (once per row).

    A sink is a key with logit `sinks[h]` and a zero value: `L' = logaddexp(L, sink)`
    and `O' = O exp(L - L')`. A row with no visible key gets `O' = 0`, `L' = sink`.
    """
    sink = sinks_n.to(L_BNT.dtype)[None, :, None]
    L = torch.logaddexp(L_BNT, sink)
    return O_BNTH * torch.exp(L_BNT - L)[..., None], L


def sinks_grad(L_BNT, D_BNT, sinks_n):
    """`d loss / d sinks (n,)` from the final LSE (sinks joined) and `D = rowsum(dO * O)`.

    The sink's probability is `exp(sink - L)` and its value is zero, so its
    score gradient is `-P_sink D`, summed over batch and rows.
    """
    p = torch.exp(sinks_n.to(L_BNT.dtype)[None, :, None] - L_BNT)
    return -(p * D_BNT).sum(dim=(0, 2)).to(sinks_n.dtype)

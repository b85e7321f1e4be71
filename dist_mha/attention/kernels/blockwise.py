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

Three implementations:
- "sdpa": torch's CPU flash kernels (`aten._scaled_dot_product_flash_attention_for_cpu`
  and its backward, which take `out` and `logsumexp`): grouped K/V in place,
  masks as an additive bias. CPU, no dropout, `H == Hv`.
- "flash_cuda": torch's CUDA flash kernels (`aten._scaled_dot_product_flash_attention`
  and its backward, as torch's own context parallelism drives them) for the
  blocks without a mask (every block of causal attention without padding:
  full or diagonal); masked blocks of the same call run on math. fp16/bf16,
  no dropout, `H == Hv`, head size a multiple of 8 up to 256. Not yet run
  on a GPU: `tests/test_gpu.py` checks it against math (`bench/gpu_check.sh`).
- "math": explicit scores, any device and dtype, grouped K/V repeated, and
  dropout with a given keep-mask (counter-based, so the backward sees the
  forward's mask without storing it).
All report rows with no visible key as `lse = -inf` and a zero output.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def choose(q_BNTH, v_BKSH, dropout: bool, forced: str | None) -> tuple[str, str]:
    """`(implementation, why)` for the blocks of one ring call."""
    reasons = []
    H = q_BNTH.shape[-1]
    if q_BNTH.device.type == "cuda":
        if q_BNTH.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {q_BNTH.dtype}: the CUDA flash kernels take float16/bfloat16")
        if H % 8 or H > 256:
            reasons.append(f"head size {H}: the CUDA flash kernels take multiples of 8 up to 256")
    elif q_BNTH.device.type != "cpu":
        reasons.append(f"inputs on {q_BNTH.device.type}: the LSE-returning SDPA ops are wired for CPU and CUDA")
    if q_BNTH.shape[-1] != v_BKSH.shape[-1]:
        reasons.append(f"key_dim {q_BNTH.shape[-1]} != value_dim {v_BKSH.shape[-1]}")
    if dropout:
        reasons.append("dropout masks must be replayed in the backward (the math blocks take them explicitly)")
    if forced == "math":
        reasons.append("attention_backend='math'")
    if reasons:
        return "math", "ring blocks on math: " + "; ".join(reasons)
    if q_BNTH.device.type == "cuda":
        return "flash_cuda", ("ring blocks on SDPA's CUDA flash kernel where a block has no mask (LSE returned, "
                              "backward given the merged LSE), masked blocks on math")
    return "sdpa", "ring blocks on SDPA's CPU flash kernel (LSE returned, backward given the merged LSE)"


def _heads(x_BKSH, n):
    g = n // x_BKSH.shape[1]
    return x_BKSH if g == 1 else x_BKSH.repeat_interleave(g, dim=1)


def _fold(dx_BNSH, k):
    """Sums the gradients of repeated key/value heads back to k heads."""
    B, n, s, h = dx_BNSH.shape
    return dx_BNSH if n == k else dx_BNSH.view(B, k, n // k, s, h).sum(dim=2)


def _live(mask, shape_BNT, is_causal=False):
    """Rows with at least one visible key (None: every row)."""
    if mask is None:
        return None
    if not is_causal:
        return mask.any(dim=-1).expand(shape_BNT)
    if mask.shape[-2] == 1:
        # Key padding under a diagonal causal block: row i sees keys 0..i.
        return mask.cummax(dim=-1).values.squeeze(-2).expand(shape_BNT)
    return (mask & torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()).any(dim=-1).expand(shape_BNT)


def _bias(mask, dtype):
    return None if mask is None else torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, _NEG_INF)


def _with_causal(mask, is_causal, q_BNTH, k_BKSH):
    """The math blocks build the diagonal block's causal mask the kernels take as a flag."""
    if not is_causal:
        return mask
    t, s = q_BNTH.shape[2], k_BKSH.shape[2]
    causal = torch.ones(t, s, dtype=torch.bool, device=q_BNTH.device).tril()
    return causal if mask is None else mask & causal


def forward(impl, q_BNTH, k_BKSH, v_BKSH, mask, scale, keep=None, rate=0.0, is_causal=False, state=None):
    """One block: `(out_BNTH normalised over this block, lse_BNT)`.

    Args:
        impl: "sdpa", "flash_cuda" or "math" (see `choose`).
        mask: bool, broadcastable to `(B, n, t, s)`, True to attend; None: every key.
        keep: dropout keep-mask `(B, n, t, s)` (math only), applied with `1 / (1 - rate)`.
        is_causal: top-left causal on top of `mask` (a diagonal block; no positional mask is built).
        state: a dict that keeps what the CUDA flash backward needs besides
            the merged output and LSE (its placeholder arguments, shape-independent).
    """
    shape_BNT = q_BNTH.shape[:3]
    if impl == "flash_cuda" and mask is None:
        out, lse, *rest = torch.ops.aten._scaled_dot_product_flash_attention(
            q_BNTH, k_BKSH, v_BKSH, dropout_p=0.0, is_causal=is_causal, return_debug_mask=False, scale=scale)
        if state is not None:
            state.setdefault("flash_rest", rest[:6])  # cum_seq_q, cum_seq_k, max_q, max_k, philox seed, offset
        return out, lse.float()
    if impl == "flash_cuda":
        impl = "math"  # a masked block
    if impl == "sdpa":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_BNTH, k_BKSH, v_BKSH, is_causal=is_causal, attn_mask=_bias(mask, q_BNTH.dtype), scale=scale)
        live = _live(mask, shape_BNT, is_causal)
        if live is not None:
            # The kernel reports lse = 0 for a row with no visible key; merging needs -inf.
            lse = lse.masked_fill(~live, _NEG_INF)
        return out, lse.to(lse_dtype(q_BNTH.dtype))
    n = q_BNTH.shape[1]
    s_BNTS = _scores(q_BNTH, k_BKSH, _with_causal(mask, is_causal, q_BNTH, k_BKSH), scale)
    lse = torch.logsumexp(s_BNTS, dim=-1)
    p = torch.exp(s_BNTS - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    if keep is not None:
        p = p * keep / (1.0 - rate)
    out = torch.matmul(p.to(v_BKSH.dtype), _heads(v_BKSH, n))
    return out, lse.to(lse_dtype(q_BNTH.dtype))


def _scores(q_BNTH, k_BKSH, mask, scale):
    """`(B, n, t, s)` scaled scores (float32 at least; Keras scales the query first), masked with -inf."""
    acc = lse_dtype(q_BNTH.dtype)
    s = torch.matmul((q_BNTH * scale).to(acc), _heads(k_BKSH, q_BNTH.shape[1]).to(acc).transpose(-1, -2))
    return s if mask is None else s.masked_fill(~mask, _NEG_INF)


def backward(impl, dO_BNTH, q_BNTH, k_BKSH, v_BKSH, O_BNTH, L_BNT, D_BNT, mask, scale, keep=None, rate=0.0,
             is_causal=False, state=None):
    """Gradients of one block `(dq_BNTH, dk_BKSH, dv_BKSH)` from the final `O`, `L` and `D = rowsum(dO * O)`.

    Rows with `L = -inf` (nothing visible anywhere) must come with `dO = 0`
    and a finite `L` (the caller substitutes 0): their gradient is zero.
    """
    if impl == "flash_cuda" and mask is None:
        cum_q, cum_k, max_q, max_k, seed, offset = state["flash_rest"]
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dO_BNTH, q_BNTH, k_BKSH, v_BKSH, O_BNTH, L_BNT.float(), cum_q, cum_k, max_q, max_k, 0.0, is_causal,
            seed, offset, scale=scale)
    if impl == "flash_cuda":
        impl = "math"
    if impl == "sdpa":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dO_BNTH, q_BNTH, k_BKSH, v_BKSH, O_BNTH, L_BNT.to(lse_dtype(q_BNTH.dtype)), 0.0, is_causal,
            attn_mask=_bias(mask, q_BNTH.dtype), scale=scale)
        return dq, dk, dv
    n, k = q_BNTH.shape[1], k_BKSH.shape[1]
    acc = lse_dtype(q_BNTH.dtype)
    mask = _with_causal(mask, is_causal, q_BNTH, k_BKSH)
    p = torch.exp(_scores(q_BNTH, k_BKSH, mask, scale) - L_BNT[..., None])  # the final probabilities
    v = _heads(v_BKSH, n).to(acc)
    dO = dO_BNTH.to(acc)
    z = p if keep is None else p * keep / (1.0 - rate)
    dv = torch.matmul(z.transpose(-1, -2), dO)
    dp = torch.matmul(dO, v.transpose(-1, -2))
    if keep is not None:
        dp = dp * keep / (1.0 - rate)
    ds = p * (dp - D_BNT[..., None].to(acc))
    dq = torch.matmul(ds, _heads(k_BKSH, n).to(acc)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q_BNTH.to(acc)) * scale
    dt = q_BNTH.dtype
    return dq.to(dt), _fold(dk, k).to(k_BKSH.dtype), _fold(dv, k).to(v_BKSH.dtype)


def merge(out_acc, lse_acc, out_b, lse_b):
    """Exact combination of two partial attentions over disjoint key sets: `(out, lse)`.

    `out_*` are `(B, n, t, Hv)` normalised over their own keys; rows where
    both `lse` are -inf stay zero with `lse = -inf`.
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

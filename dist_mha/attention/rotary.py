"""Rotating queries and keys by their positions, and normalising them per head (QK-norm).

Shape legend: B batch, T positions of this call, n heads, H head size, R rotated
features (the first R of each head; the rest pass through), F = R / 2 angles.

Angles are `position * inv_freq`, elementwise (never a matmul autocast could
lower). Their precision follows Hugging Face's order in half precision:
angles in float32, cos/sin times the attention scaling in float32, cast to the
activation dtype, the rotation in the activation dtype. For float32 and
float64 activations the angles are computed in float64 and cast once, so a
float64 call matches a float64 reference to ~1e-15 (Hugging Face's float32
angles are off by ~1e-5 at position 1000).

`rotate` applies one pair of turn tables (`angles`: cos and sin laid out
for the pairs) to queries and keys in one autograd node whose backward is
the inverse rotation (nothing but the tables is saved without QK-norm). Half
split (`rotate_half`, Hugging Face's layout) pairs feature i with i + R/2;
interleaved (GPT-J) pairs 2i with 2i + 1. On CUDA, with flash-attn installed
and positions that are one range for every row, flash-attn's rotary kernel
does the same work.
"""

from __future__ import annotations

import importlib
import math

import torch

from dist_mha.attention.rope import Rope


def _cos_sin(rope: Rope, positions: torch.Tensor, dtype: torch.dtype, longest: int | None = None):
    """`(cos, sin)` of shape `(B|1, T, 1, F)` in `dtype` for int positions `(B|1, T)`."""
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64
    inv = rope.frequencies(longest, positions.device, compute)
    freqs = positions[..., None].to(compute) * inv  # (B|1, T, F)
    scaling = rope.attention_scaling()
    cos, sin = freqs.cos(), freqs.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def angles(rope: Rope, positions: torch.Tensor, dtype: torch.dtype, longest: int | None = None):
    """The turn tables `(C, S)` of int positions `(B|1, T)`: `(B|1, T, 1, R)` in `dtype`.

    In the pair layout, `C = (cos, cos)` and `S = (-sin, sin)`: each pair `(a, b)`
    turns to `(a C_a + b S_a, b C_b + a S_b)`, which is `turn(x) = x C + swap(x) S`.
    """
    cos, sin = _cos_sin(rope, positions, dtype, longest)
    return _join(cos, cos, rope.interleaved), _join(-sin, sin, rope.interleaved)


def range_angles(rope: Rope, stop: int, dtype: torch.dtype, device: torch.device):
    """`angles` of positions `0..stop-1` (every row), cached on `rope`: the default positions of a call.

    Tables are kept for a power-of-two length (at least 64) and sliced, so decoding
    steps share one. Made per call inside `inference_mode` (no inference tensor is
    kept for later calls with autograd) and under `torch.compile` (no side effects
    in a traced function).
    """
    longest = stop if rope.depends_on_length else None
    if torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
        return angles(rope, torch.arange(stop, device=device)[None], dtype, longest)
    size = stop if longest is not None else max(64, 1 << (stop - 1).bit_length())
    key = (size, longest, str(device), dtype)
    table = rope._angles.get(key)
    if table is None:
        if len(rope._angles) >= 8:
            rope._angles.clear()
        table = rope._angles[key] = angles(rope, torch.arange(size, device=device)[None], dtype, longest)
    return table[0][:, :stop], table[1][:, :stop]


def _pairs(x, R, interleaved):
    """`(a, b)`: the two halves of each rotated pair of `x[..., :R]` as views."""
    rot = x if R == x.shape[-1] else x[..., :R]
    if interleaved:
        return rot.unflatten(-1, (R // 2, 2)).unbind(-1)
    return rot.unflatten(-1, (2, R // 2)).unbind(-2)


def _join(a, b, interleaved):
    """The inverse of `_pairs`: `(.., F)` halves to `(.., 2F)` in the pair layout."""
    return torch.stack([a, b], -1).flatten(-2) if interleaved else torch.cat([a, b], -1)


def _swap(x, interleaved):
    """The halves of each pair exchanged (one copy)."""
    if interleaved:
        return x.unflatten(-1, (x.shape[-1] // 2, 2)).flip(-1).flatten(-2)
    return x.roll(x.shape[-1] // 2, -1)


def _tables(C, S, weight, R, interleaved, heads):
    """`(C, S, w_pass)` for `x` with `heads` heads: the turn tables of `angles` with a weight folded in.

    `(C w, S swap(w))` turns `x w` (the pair layout's order of `w`); `w_pass` is the
    weight of the features past `R`. For large calls the tables are laid out for
    `heads` heads, contiguous, so every op of the turn is a contiguous elementwise
    pass: broadcasting a `(.., T, 1, R)` table over a small head dim is several
    times slower on CPU (a rotation of (8, 128, 8, 32): 1.2 -> 0.33 ms). The
    weight is multiplied in by the same op that lays the tables out.
    """
    w = None if weight is None else weight[:R]
    if heads > 1 and C.numel() * heads >= _EXPAND_AT:
        shape = (*C.shape[:2], heads, R)
        C, S = C.expand(shape), S.expand(shape)
        if w is None:
            C, S = C.contiguous(), S.contiguous()
    if w is not None:
        C, S = C * w, S * _swap(w, interleaved)
    return C, S, None if weight is None or R == weight.shape[-1] else weight[R:]


_EXPAND_AT = 4096  # table elements from which laying tables out per head beats broadcasting (decoding: not)


def _turn(x, tables, R, interleaved, exact_rounding=False, inverse=False):
    """Each pair (a, b) of `x[..., :R]` to `(a C_a + b S_a, b C_b + a S_b)`; the other features times `w_pass`.

    `inverse`: the transpose (for unweighted tables, the turn by the opposite angle).
    """
    C, S, w_pass = tables
    rot = x if R == x.shape[-1] else x[..., :R]
    if exact_rounding:  # Hugging Face's half-precision rounding: x*cos and rotate_half(x)*sin each rounded
        out = torch.add(rot * C, _swap(rot, interleaved) * S)
    else:
        # x C, then each half of the pairs gets the other half times S, in place on views: no swapped copy of x
        # (a `cat` along the head dim is a strided copy, and each fresh activation-sized buffer costs page
        # faults on CPU: 1.4 -> 0.27 ms for q (8, 128, 8, 32) and k (8, 128, 2, 32) fresh from a matmul).
        out = rot * C
        (a, b), (out_a, out_b), (S_a, S_b) = (_pairs(t, R, interleaved) for t in (rot, out, S))
        sign = -1 if inverse else 1
        out_a.addcmul_(b, S_a, value=sign)
        out_b.addcmul_(a, S_b, value=sign)
    if R == x.shape[-1]:
        return out
    rest = x[..., R:] if w_pass is None else x[..., R:] * w_pass
    return torch.cat([out, rest], -1)


def _norm_turn(x, w, C, S, R, interleaved, eps):
    """`turn(rms_norm(x, w))`, returning `(out, h)` with `h = sqrt(sum(x^2) + H eps)` per row (None without `w`).

    `rms_norm(x) = x sqrt(H) / h`: `sqrt(H) w` is folded into the tables and the
    division by `h` (a per-row scalar, which the turn commutes with) comes last, in
    place, so only the output is allocated at `x`'s size, and `h` takes one reduction.
    """
    if w is None:
        return _turn(x, _tables(C, S, None, R, interleaved, x.shape[-2]), R, interleaved), None
    H = x.shape[-1]
    h = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), x.new_tensor(math.sqrt(H * eps)))
    out = _turn(x, _tables(C, S, w * math.sqrt(H), R, interleaved, x.shape[-2]), R, interleaved)
    return out.div_(h), h


def _few_ops(x, w, C, S, R, interleaved, eps):
    """`turn(rms_norm(x, w))` in the fewest ops (each op's fixed cost outweighs its passes on small inputs)."""
    if w is not None:
        x = rms_norm(x, w, eps)
    rot = x if R == x.shape[-1] else x[..., :R]
    out = torch.addcmul(rot * C, _swap(rot, interleaved), S)
    return out if R == x.shape[-1] else torch.cat([out, x[..., R:]], -1)


_FEW_OPS_BELOW = 16384  # elements of x under which `_few_ops` beats `_norm_turn` (decoding steps; CPU, 1 thread)


def _unturn(g, C, S, R, interleaved):
    """The adjoint of the unweighted turn: the turn by the opposite angle."""
    return _turn(g, _tables(C, S, None, R, interleaved, g.shape[-2]), R, interleaved, inverse=True)


class _NormRotate(torch.autograd.Function):
    """`rotate(rms_norm(x, w))` for each `x` (weight None: rotation alone): one node, fewer passes, little saved."""

    @staticmethod
    def forward(ctx, C, S, R, interleaved, eps, n, *args):
        xs, weights = args[:n], args[n:]
        outs, saved = [], [C, S]
        for x, w in zip(xs, weights):
            out, h = _norm_turn(x, w, C, S, R, interleaved, eps)
            outs.append(out)
            saved += [x, h, w] if w is not None else [None, None, None]
        ctx.save_for_backward(*saved)
        ctx.R, ctx.interleaved = R, interleaved
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        C, S, *saved = ctx.saved_tensors
        dxs, dws = [], []
        for i, g in enumerate(grads):
            # The rotation is orthogonal: its adjoint turns by the opposite angle (weights folded out).
            u = None if g is None else _unturn(g, C, S, ctx.R, ctx.interleaved)
            x, h, w = saved[3 * i:3 * i + 3]
            if w is None or u is None:
                dxs.append(u)
                dws.append(None)
                continue
            # With r = sqrt(H) / h and xr = x r (the normed input, never materialised: each x-sized buffer costs a
            # pass and, on CPU, page faults): dw = sum over rows of xr u; dx = r (dxr - xr mean(dxr xr))
            # = r dxr - x r^2 mean(...). Both reductions of y = x u are matrix-vector products (one read each, no
            # further buffer): dw = y^T r over rows, and sum(dxr xr) = (y w) r per row.
            H = x.shape[-1]
            r = h.reciprocal().mul_(math.sqrt(H))
            y = torch.mul(x, u).reshape(-1, H)
            r_rows = r.reshape(-1)
            dws.append(y.t().mv(r_rows))
            c = y.mv(w).mul_(r_rows).mul_(r_rows).div_(H).view_as(r)  # r^2 mean(dxr * xr)
            dxs.append(u.mul_(w).addcmul_(x, c, value=-1).mul_(r))  # r (dxr - x r^2 mean(dxr xr)); u is free
        return (None, None, None, None, None, None, *dxs, *dws)


def rotate(rope: Rope, C, S, *xs, norm_weights=None, eps: float = 1e-6):
    """`xs` (each `(B, T, n, H)`) turned by the tables `(C, S)` from `angles`; one autograd node.

    `norm_weights`: one `(H,)` RMSNorm weight (or None) per `x`, applied
    before the rotation in the same node (float32/float64: the norm's weight
    is folded into the turn tables). Half precision keeps Hugging Face's
    order and rounding: RMSNorm in float32, cast, times the weight, then the
    rotation with each product rounded.
    """
    weights = list(norm_weights) if norm_weights is not None else [None] * len(xs)
    R, inter = rope.rotary_dim, rope.interleaved
    if xs[0].dtype in (torch.float16, torch.bfloat16):
        xs = [x if w is None else rms_norm(x, w, eps) for x, w in zip(xs, weights)]
        if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
            out = _Rotate.apply(C, S, R, inter, *xs)
        else:
            out = tuple(_turn(x, _tables(C, S, None, R, inter, x.shape[-2]), R, inter, exact_rounding=True)
                        for x in xs)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*xs, *weights)):
        weights = [None if w is None else w.to(x.dtype) for x, w in zip(xs, weights)]
        out = _NormRotate.apply(C, S, R, inter, eps, len(xs), *xs, *weights)
    else:  # inference: the same arithmetic without the autograd node
        weights = [None if w is None else w.to(x.dtype) for x, w in zip(xs, weights)]
        out = tuple(_few_ops(x, w, C, S, R, inter, eps) if x.numel() < _FEW_OPS_BELOW
                    else _norm_turn(x, w, C, S, R, inter, eps)[0] for x, w in zip(xs, weights))
    return out if len(xs) > 1 else out[0]


class _Rotate(torch.autograd.Function):
    """The rotation alone, in Hugging Face's half-precision rounding."""

    @staticmethod
    def forward(ctx, C, S, R, interleaved, *xs):
        ctx.save_for_backward(C, S)
        ctx.R, ctx.interleaved = R, interleaved
        return tuple(_turn(x, _tables(C, S, None, R, interleaved, x.shape[-2]), R, interleaved, exact_rounding=True)
                     for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        C, S = ctx.saved_tensors
        back = tuple(None if g is None else _unturn(g, C, S, ctx.R, ctx.interleaved) for g in grads)
        return (None, None, None, None, *back)


_FLASH_ROTARY = []


def flash_rotary():
    """flash-attn's `apply_rotary_emb`, or None when flash-attn (with its rotary kernel) is not installed."""
    if not _FLASH_ROTARY:
        try:
            _FLASH_ROTARY.append(importlib.import_module("flash_attn.layers.rotary").apply_rotary_emb)
        except Exception:  # not installed, or built without the rotary kernel
            _FLASH_ROTARY.append(None)
    return _FLASH_ROTARY[0]


def kernel_takes(x: torch.Tensor) -> bool:
    """Whether flash-attn's rotary kernel takes `x`: CUDA, float16/bfloat16."""
    return x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)


def forget_flash_rotary() -> None:
    """Looks for flash-attn's rotary kernel again on next use (after an install; `flash.reload` calls it)."""
    _FLASH_ROTARY.clear()


def rotate_range(rope: Rope, start: int, x: torch.Tensor, longest: int | None = None):
    """`x (B, T, n, H)` at positions `start..start+T-1` (every row) with flash-attn's kernel.

    The kernel takes a `(positions, F)` table and a position offset; with
    half-split pairs it is `interleaved=False`, with GPT-J pairs `True`.
    """
    T = x.shape[1]
    cos, sin = _cos_sin(rope, torch.arange(start + T, device=x.device)[None], x.dtype, longest)
    return flash_rotary()(x, cos[0, :, 0], sin[0, :, 0], interleaved=rope.interleaved, seqlen_offsets=start)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * weight`.

    float32/float64: torch's fused `rms_norm` (one op). Half precision follows
    Hugging Face's order: normalise in float32, cast back, then times `weight`.
    """
    if x.dtype in (torch.float32, torch.float64):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    wide = x.float()
    normed = wide * torch.rsqrt(wide.square().mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight.to(x.dtype)

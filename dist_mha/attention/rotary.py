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

`rotate` applies one angle table to queries and keys in one autograd node
whose backward is the inverse rotation (nothing but cos/sin is saved). Half
split (`rotate_half`, Hugging Face's layout) pairs feature i with i + R/2;
interleaved (GPT-J) pairs 2i with 2i + 1. On CUDA, with flash-attn installed
and positions that are one range for every row, flash-attn's rotary kernel
does the same work.
"""

from __future__ import annotations

import importlib

import torch

from dist_mha.attention.rope import Rope


def angles(rope: Rope, positions: torch.Tensor, dtype: torch.dtype, longest: int | None = None):
    """`(cos, sin)` of shape `(B|1, T, 1, F)` in `dtype` for int positions `(B|1, T)`."""
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64
    inv = rope.inverse_frequencies(longest).to(device=positions.device, dtype=compute)
    freqs = positions[..., None].to(compute) * inv  # (B|1, T, F)
    scaling = rope.attention_scaling()
    cos, sin = freqs.cos(), freqs.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def _pairs(x, R, interleaved):
    """`(a, b)`: the two halves of each rotated pair of `x[..., :R]` as views."""
    rot = x[..., :R]
    if interleaved:
        rot = rot.unflatten(-1, (R // 2, 2))
        return rot[..., 0], rot[..., 1]
    return rot[..., : R // 2], rot[..., R // 2:]


def _turn(x, cos, sin, R, interleaved):
    """`x` with each pair (a, b) turned to (a cos - b sin, b cos + a sin); features past R copied."""
    out = torch.empty_like(x)
    out[..., R:] = x[..., R:]
    a, b = _pairs(x, R, interleaved)
    oa, ob = _pairs(out, R, interleaved)
    # Hugging Face's rounding: x*cos and rotate_half(x)*sin each rounded, then added.
    torch.sub(a * cos, b * sin, out=oa)
    torch.add(b * cos, a * sin, out=ob)
    return out


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cos, sin, R, interleaved, *xs):
        ctx.save_for_backward(cos, sin)
        ctx.R, ctx.interleaved = R, interleaved
        return tuple(_turn(x, cos, sin, R, interleaved) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        # The rotation is orthogonal: its adjoint turns by the opposite angle.
        back = tuple(None if g is None else _turn(g, cos, -sin, ctx.R, ctx.interleaved) for g in grads)
        return (None, None, None, None, *back)


def rotate(rope: Rope, cos, sin, *xs):
    """`xs` (each `(B, T, n, H)`) rotated by the angle table `(cos, sin)` from `angles`; one autograd node."""
    out = _Rotate.apply(cos, sin, rope.rotary_dim, rope.interleaved, *xs)
    return out if len(xs) > 1 else out[0]


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
    cos, sin = angles(rope, torch.arange(start + T, device=x.device)[None], x.dtype, longest)
    return flash_rotary()(x, cos[0, :, 0], sin[0, :, 0], interleaved=rope.interleaved, seqlen_offsets=start)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, Hugging Face's order: normalise in float32 (or wider), cast back, times `weight`."""
    wide = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    normed = wide * torch.rsqrt(wide.square().mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight.to(x.dtype)

"""Stand-in flash-attn packages, written to a temporary directory, for testing dist_mha's glue on CPU.

Each fake has the import layout and the function signatures of a real build
(copied from flash-attn's sources at the versions named), checks the
argument types flash-attn's C++ entry points would reject, records every
call, and computes plain attention in float32 (GQA by repetition, causal and
window aligned bottom-right as flash-attn does). They test what dist_mha
passes and how it handles the answer; they say nothing about the real
kernels' speed or numerics.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

_CORE = '''
import torch

CALLS = []


def _attend(q, k, v, scale, causal, window, dropout_p, softcap=0.0, sinks=None):
    T, S, N, K = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(N // K, 2).float(), v.repeat_interleave(N // K, 2).float()
    scores = torch.einsum("btnh,bsnh->bnts", q.float(), k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(T)[:, None] + (S - T)
    j = torch.arange(S)[None, :]
    keep = torch.ones(T, S, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None and tuple(window) != (-1, -1) and tuple(window) != (None, None):
        keep &= (j >= i - window[0]) & (j <= i + window[1])
    scores = scores.masked_fill(~keep, float("-inf"))
    if sinks is not None:  # a logit column per head, dropped after the softmax
        scores = torch.cat([scores, sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], -1)
    probs = scores.softmax(-1)[..., :S]
    if dropout_p:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return torch.einsum("bnts,bsnh->btnh", probs, v).to(q.dtype)


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.stride(-1) != 1:
            raise RuntimeError(f"{name} must have contiguous last dimension")


def _check_varlen(cu_q, cu_k, max_q, max_k, seqused_q=None, seqused_k=None):
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{name} must be an int32 tensor, got {type(t).__name__}")
    for name, t in (("seqused_q", seqused_q), ("seqused_k", seqused_k)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    for name, n in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if n is not None and (isinstance(n, torch.Tensor) or not isinstance(n, int)):
            raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if max_k is not None and int((cu_k[1:] - cu_k[:-1]).max()) > max_k:
        raise RuntimeError("a key sequence is longer than max_seqlen_k")


def _varlen(q, k, v, cu_q, cu_k, scale, causal, window, dropout_p, softcap=0.0, sinks=None):
    outs = []
    for b in range(len(cu_q) - 1):
        qs, ks, vs = (t[c[b]:c[b + 1]][None] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        outs.append(_attend(qs, ks, vs, scale, causal, window, dropout_p, softcap, sinks)[0])
    return torch.cat(outs)


def _record(fn, q, k, v, **kwargs):
    CALLS.append(dict(fn=fn, q=q, k=k, v=v, **kwargs))


def _unobserved(fn):
    # A test may watch dist_mha's ops with a TorchDispatchMode; the fake's own ops are not dist_mha's.
    import functools
    from torch.utils._python_dispatch import _disable_current_modes

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _disable_current_modes():
            return fn(*args, **kwargs)

    return wrapper
'''

# flash-attn 2.8.x: flash_attn/flash_attn_interface.py.
_FA2 = _CORE + '''

@_unobserved
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    _check_qkv(q, k, v)
    _record("dense", q, k, v, dropout_p=dropout_p, causal=causal, window_size=window_size, softcap=softcap)
    return _attend(q, k, v, softmax_scale, causal, window_size, dropout_p, softcap)


@_unobserved
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    _check_qkv(q, k, v)
    _check_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _record("varlen", q, k, v, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p,
            softcap=softcap)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size, dropout_p, softcap)
'''

# FA3 of the v2.7.3/2.7.4 era (hopper/flash_attn_interface.py, January 2025): seqused_q/k, with no
# default, come before max_seqlen_q/k; the functions return (out, softmax_lse).
_FA3_2025_01 = _CORE + '''

@_unobserved
def flash_attn_func(q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None,
                    window_size=(-1, -1), sink_token_length=0, softcap=0.0, num_splits=1, pack_gqa=None,
                    deterministic=False, sm_margin=0):
    _check_qkv(q, k, v)
    _record("dense", q, k, v, causal=causal, window_size=window_size)
    return _attend(q, k, v, softmax_scale, causal, window_size, 0.0), None


@_unobserved
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None,
                           window_size=(-1, -1), sink_token_length=0, softcap=0.0, num_splits=1, pack_gqa=None,
                           deterministic=False, sm_margin=0):
    _check_qkv(q, k, v)
    _check_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k)
    _record("varlen", q, k, v, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size, 0.0), None
'''

# The first FA3 (hopper/, August 2024): no window_size.
_FA3_2024_08 = _CORE + '''

@_unobserved
def flash_attn_func(q, k, v, softmax_scale=None, causal=False, deterministic=False):
    _check_qkv(q, k, v)
    _record("dense", q, k, v, causal=causal)
    return _attend(q, k, v, softmax_scale, causal, None, 0.0), None


@_unobserved
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, deterministic=False):
    _check_qkv(q, k, v)
    _check_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _record("varlen", q, k, v, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, None, 0.0), None
'''

# flash-attn-4 (flash_attn/cute/interface.py, November 2025): keyword-heavy, no dropout, no
# max_seqlen_*, windows as (None, None); returns (out, lse).
_FA4 = _CORE + '''

@_unobserved
def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                    softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, mask_mod=None,
                    full_block_cnt=None, full_block_idx=None, mask_block_cnt=None, mask_block_idx=None,
                    block_size=None, return_lse=False):
    _check_qkv(q, k, v)
    _record("dense", q, k, v, causal=causal, window_size=window_size, softcap=softcap, learnable_sink=learnable_sink)
    return _attend(q, k, v, softmax_scale, causal, window_size, 0.0, softcap, learnable_sink), None


@_unobserved
def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                           page_table=None, softmax_scale=None, causal=False, window_size=(None, None),
                           learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
                           score_mod=None, aux_tensors=None, return_lse=False):
    _check_qkv(q, k, v)
    _check_varlen(cu_seqlens_q, cu_seqlens_k, None, None, seqused_q, seqused_k)
    _record("varlen", q, k, v, softcap=softcap, learnable_sink=learnable_sink)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size, 0.0, softcap,
                   learnable_sink), None
'''

# flash-attn 2.8.x: flash_attn/layers/rotary.py (signature of apply_rotary_emb; plain torch inside).
_ROTARY = '''
import torch

CALLS = []


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    if cos.dtype != x.dtype or cos.dim() != 2 or cos.shape != sin.shape:
        raise RuntimeError("cos and sin must be (seqlen_rotary, rotary_dim / 2) in the input's dtype")
    CALLS.append(dict(shape=tuple(x.shape), table=tuple(cos.shape), interleaved=interleaved, offset=seqlen_offsets))
    T, R = x.shape[1], 2 * cos.shape[1]
    c = cos[seqlen_offsets:seqlen_offsets + T][None, :, None]
    s_ = sin[seqlen_offsets:seqlen_offsets + T][None, :, None]
    rot = x[..., :R].unflatten(-1, (R // 2, 2) if interleaved else (2, R // 2))
    a, b = (rot[..., 0], rot[..., 1]) if interleaved else (rot[..., 0, :], rot[..., 1, :])
    pair = torch.stack([a * c - b * s_, b * c + a * s_], -1 if interleaved else -2).flatten(-2)
    return torch.cat([pair, x[..., R:]], -1)
'''

FAKES = {
    # name: {relative path: source}
    "fa2": {"flash_attn/__init__.py": _FA2, "flash_attn/layers/__init__.py": "", "flash_attn/layers/rotary.py": _ROTARY},
    "fa3_2025_01": {"flash_attn_interface.py": _FA3_2025_01},
    "fa3_2024_08": {"flash_attn_interface.py": _FA3_2024_08},
    # The flash-attn-4 wheel alone: flash_attn/cute/ with no flash_attn/__init__.py.
    "fa4_alone": {"flash_attn/cute/__init__.py": "from .interface import flash_attn_func, flash_attn_varlen_func\n",
                  "flash_attn/cute/interface.py": _FA4},
    # A flash_attn whose extension fails to load.
    "fa2_broken": {"flash_attn/__init__.py": "raise OSError('libcudart.so.12: cannot open shared object file')\n"},
}

_MODULES = ("flash_attn", "flash_attn_interface")


def _forget_modules():
    for name in list(sys.modules):
        if name.split(".")[0] in _MODULES:
            del sys.modules[name]


@pytest.fixture
def fake_flash(tmp_path, monkeypatch):
    """`install(*names)`: puts the named fakes on sys.path and makes dist_mha look for flash-attn again.

    The flash backend's CUDA check and capability query are patched so the
    fakes run on CPU tensors; `install` returns the flash module, whose
    `_capability` the test may patch further. Everything is undone afterwards.
    """
    from dist_mha.attention.kernels import flash

    dirs = []

    def install(*names, capability=(9, 0)):
        for old in dirs:  # each install replaces the previous one
            sys.path.remove(str(old))
        dirs.append(tmp_path / f"site{len(dirs)}")
        for name in names:
            for rel, src in FAKES[name].items():
                path = dirs[-1] / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(textwrap.dedent(src))
        monkeypatch.syspath_prepend(str(dirs[-1]))
        _forget_modules()
        flash.reload()
        monkeypatch.setattr(flash, "_is_cuda", lambda t: True)
        monkeypatch.setattr(flash, "_capability", lambda device: capability)
        return flash

    yield install
    monkeypatch.undo()
    _forget_modules()
    flash.reload()


def calls(module="flash_attn"):
    """The calls the fake `module` recorded."""
    if module == "flash_attn.cute":
        return sys.modules["flash_attn.cute.interface"].CALLS
    return sys.modules[module].CALLS

"""CUDA checks: SDPA and flash-attn in bf16/fp16 against the exact math path.

Skipped with a reason on machines without CUDA (and, for flash, without the
flash-attn package). Tolerance: bf16 outputs of a softmax-weighted average
carry ~3 significant digits, so 2e-2 relative to a float32 reference.
"""

from __future__ import annotations

import pytest
import torch

from dist_mha import MultiHeadAttention
from dist_mha.attention.kernels import flash

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA, found none")
needs_flash = pytest.mark.skipif(not flash.AVAILABLE, reason="needs the flash-attn package, not installed")

B, T, S, E = 2, 128, 96, 256
MASKS = {
    "none": lambda d: {},
    "causal": lambda d: dict(use_causal_mask=True),
    "padding": lambda d: dict(value_mask=torch.arange(S, device=d)[None].expand(B, S) < torch.tensor([[S], [S // 2]], device=d)),
    "query_padding": lambda d: dict(query_mask=torch.arange(T, device=d)[None].expand(B, T) < torch.tensor([[T], [T // 3]], device=d)),
    "attention_mask": lambda d: dict(attention_mask=torch.rand(B, T, S, device=d) < 0.8),
}


def _pair(backend, dtype, self_attention):
    torch.manual_seed(0)
    ref = MultiHeadAttention(4, 64, query_shape=E, value_shape=E, attention_backend="math", device="cuda")
    fast = MultiHeadAttention(4, 64, query_shape=E, value_shape=E, attention_backend=backend, device="cuda")
    fast.load_state_dict(ref.state_dict())
    q = torch.randn(B, T, E, device="cuda")
    v = q if self_attention else torch.randn(B, S, E, device="cuda")
    return ref, fast, q, v


def _check(backend, dtype, mask_kind):
    self_attention = mask_kind in ("causal", "query_padding")
    ref, fast, q, v = _pair(backend, dtype, self_attention)
    kwargs = MASKS[mask_kind]("cuda")
    if self_attention and "value_mask" in kwargs:
        kwargs["value_mask"] = kwargs["value_mask"][:, : v.shape[1]]
    if mask_kind == "attention_mask" and self_attention:
        kwargs["attention_mask"] = kwargs["attention_mask"][:, :, : v.shape[1]]
    expected = ref(q, v, **kwargs)
    got = fast(q.to(dtype), v.to(dtype), **kwargs)
    assert got.dtype == dtype and fast.last_backend == backend
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_sdpa_low_precision_matches_math_on_cuda(dtype, mask_kind):
    _check("sdpa", dtype, mask_kind)


@needs_cuda
@needs_flash
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "padding", "query_padding"])
def test_flash_matches_math_on_cuda(dtype, mask_kind):
    _check("flash", dtype, mask_kind)


@needs_cuda
def test_flash_refusal_lists_every_backend_on_cuda():
    layer = MultiHeadAttention(2, 16, query_shape=64, flash_attention=True, device="cuda")
    x = torch.randn(2, 8, 64, device="cuda")
    with pytest.raises(ValueError, match="flash:.*sdpa:.*math:"):
        layer(x, x)  # float32 is refused by flash-attn whatever is installed


@needs_cuda
def test_seeded_dropout_reproducible_on_cuda():
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        layer = MultiHeadAttention(4, 16, dropout=0.3, seed=11, query_shape=64, device="cuda")
        x = torch.randn(2, 32, 64, device="cuda")
        outs.append(layer(x, x, training=True))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize("S", [192, 704])
def test_sdpa_masked_backward_is_finite_where_cudnn_gives_nan_on_cuda(S):
    """pytorch/pytorch#196678: cuDNN's backward, a mask tensor, S % 128 == 64 and
    every logit very negative (logsumexp < -88.7) gave NaN dq. dist_mha's SDPA
    order puts the efficient kernel first there; the gradients must be finite."""
    import math

    from dist_mha.attention.kernels import AttentionRequest, sdpa
    from dist_mha.attention.masks import MaskSpec

    torch.manual_seed(0)
    B, N, H = 1, 2, 64
    q = torch.randn(B, S, N, H, device="cuda", dtype=torch.bfloat16) * 0.1
    k = torch.randn(B, S, N, H, device="cuda", dtype=torch.bfloat16) * 0.1
    v = torch.randn(B, S, N, H, device="cuda", dtype=torch.bfloat16)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(H)  # every logit about -120
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    keep = torch.ones(B, S, dtype=torch.bool, device="cuda")  # an all-True key mask still passes a mask tensor
    req = AttentionRequest(q, k, v, MaskSpec(k_keep_BS=keep), scale=1 / math.sqrt(H))
    out, _ = sdpa.run(req)
    out.backward(torch.randn_like(out))
    for name, t in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name} has {(~torch.isfinite(t)).sum().item()} non-finite values"


@needs_cuda
@pytest.mark.parametrize("rate", [0.1, 0.3, 0.0625])
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_bf16_dropout_drops_the_requested_fraction_on_cuda(backend, rate):
    """q = k = 0 makes attention uniform (every probability 1/S); v = identity
    (Hv = S, value row s = e_s) makes the output the dropped probabilities
    themselves, so the fraction of exact zeros is the rate the kernel applied.
    cuDNN may resolve 0.1 to 0.0625 or 0.125 (16 * p not an integer), which
    dist_mha's SDPA call avoids by taking cuDNN away for such rates.
    n = 2**20 draws: the standard error is 3e-4 at p = 0.1, the tolerance 5e-3."""
    import math

    from dist_mha.attention.kernels import AttentionRequest
    from dist_mha.attention.kernels import sdpa as sdpa_kernel_module
    from dist_mha.attention.masks import MaskSpec

    if backend == "flash" and not any(v.dropout for v in flash.VARIANTS):
        pytest.skip("needs FA2 (the flash-attn build with dropout), not installed")
    B, T, N, S = 4, 256, 8, 128
    q = torch.zeros(B, T, N, S, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(B, S, N, S, device="cuda", dtype=torch.bfloat16)
    v = torch.eye(S, device="cuda", dtype=torch.bfloat16)[None, :, None, :].expand(B, S, N, S).contiguous()
    req = AttentionRequest(q, k, v, MaskSpec(), scale=1 / math.sqrt(S), dropout_p=rate)
    torch.manual_seed(0)
    module = sdpa_kernel_module if backend == "sdpa" else flash
    out, _ = module.run(req)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - rate) < 5e-3, f"{backend}: dropped {dropped:.4f}, asked {rate}"
    kept = out[out != 0].float()
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (S * (1 - rate))), rtol=1e-2, atol=0)


@needs_cuda
def test_dropout_from_streams_is_captured_by_a_cuda_graph_on_cuda():
    """The stream fork swaps generator states with graphsafe_set_state, which CUDA-graph capture allows
    (copying states in and out, as torch.cuda.set_rng_state does, is refused during capture)."""
    from dist_mha.rng.streams import generators

    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        pytest.skip("this torch has no CUDAGraph.register_generator_state")
    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 16, dropout=0.3, seed=11, query_shape=64, device="cuda")
    x = torch.randn(2, 32, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # warm-up outside capture (allocations, cuDNN plans, the stream generators)
            layer(x, x, training=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for gen in generators(layer, "cuda"):
        graph.register_generator_state(gen)
    with torch.no_grad(), torch.cuda.graph(graph):
        out = layer(x, x, training=True)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.isfinite(out).all() and not torch.equal(first, out)  # each replay draws new masks


def _ring_blocks_on_cuda(kv_heads):
    """Two key blocks (a full one before the queries, a diagonal one) merged with LSE, then the backward
    with the merged output and LSE: `cuda_flash` blocks against exact float32 attention."""
    from dist_mha.attention.kernels import blockwise

    g = torch.Generator(device="cuda").manual_seed(0)
    n, t, H = 4, 64, 64
    q = torch.randn(1, n, t, H, device="cuda", generator=g)
    k = torch.randn(1, kv_heads, 2 * t, H, device="cuda", generator=g)
    v = torch.randn(1, kv_heads, 2 * t, H, device="cuda", generator=g)
    dO = torch.randn(1, n, t, H, device="cuda", generator=g)
    scale = H ** -0.5
    # Reference: queries at positions t..2t-1, causal over keys 0..2t-1, float32 autograd.
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    keep = torch.arange(t, 2 * t, device="cuda")[:, None] >= torch.arange(2 * t, device="cuda")[None]
    g_ = n // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        qr, kr.repeat_interleave(g_, 1), vr.repeat_interleave(g_, 1), attn_mask=keep, scale=scale)
    ref.backward(dO)
    qb, kb, vb, dOb = (x.bfloat16() for x in (q, k, v, dO))
    impl = blockwise.choose(qb, vb, False, None)
    assert impl.unmasked == "cuda_flash", impl.why
    state = {}
    blocks = [(kb[:, :, :t], vb[:, :, :t], False), (kb[:, :, t:], vb[:, :, t:], True)]
    out = lse = None
    for kk, vv, causal in blocks:
        o_b, l_b = blockwise.forward(impl, qb, kk, vv, None, scale, is_causal=causal, state=state)
        out, lse = blockwise.merge(out, lse, o_b, l_b)
    O = out.to(torch.bfloat16)
    torch.testing.assert_close(O.float(), ref.detach(), rtol=2e-2, atol=2e-2)
    D = (dOb.float() * O.float()).sum(-1)
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for kk, vv, causal in blocks:
        dq_b, dk_b, dv_b = blockwise.backward(impl, dOb, qb, kk, vv, O, lse, D, None, scale, is_causal=causal,
                                              state=state)
        dq += dq_b.float()
        dks.append(dk_b.float())
        dvs.append(dv_b.float())
    torch.testing.assert_close(dq, qr.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(torch.cat(dks, 2), kr.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(torch.cat(dvs, 2), vr.grad, rtol=3e-2, atol=3e-2)


@needs_cuda
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_ring_blocks_on_cuda_flash_kernels_match_exact_attention(kv_heads):
    _ring_blocks_on_cuda(kv_heads)


@needs_cuda
@pytest.mark.parametrize("masks", ["causal", "padding", "packed"])
def test_ring_on_cuda_matches_one_device(cuda_rank_pool, masks):
    # Through dist_mha/parallel/cp/ring.py with B=2 rows x 4 heads (a misread LSE row would show at once):
    # flash blocks without a mask, memory-efficient blocks with padding or packed documents. bf16
    # against float32: 3e-2 of the largest value.
    import sweep_tasks

    for why, errors in cuda_rank_pool.run(sweep_tasks.ring_on_cuda, masks):
        assert max(errors.values()) < 3e-2, (errors, why)
        assert "cuda_flash" in why and (masks == "causal" or "cuda_efficient" in why), why

"""Rank-pool task bodies for test_sweep_parallel.py (the multi-process defects of issue 16)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from dist_mha.testing import compare_with_reference

B, T, E = 2, 16, 12


# -- what the ring hands the private CUDA ops --------------------------------------------------

def _exact(q, k, v, bias=None, is_causal=False, scale=None):
    """float64 attention of `(B, n, t, H)` q against `(B, k, s, H)` k/v (k repeated): `(out, lse, probs)`."""
    n = q.shape[1]
    k, v = (x.repeat_interleave(n // x.shape[1], 1).double() for x in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    return p @ v, lse, p


def _grads(dO, q, k, v, out, lse, bias, is_causal, scale):
    """Gradients from the handed-over output and LSE, as the real backward kernels compute them."""
    n, kh = q.shape[1], k.shape[1]
    kr, vr = (x.repeat_interleave(n // kh, 1).double() for x in (k, v))
    s = q.double() @ kr.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    p = torch.exp(s - lse[..., : q.shape[2], None].double())
    dO = dO.double()
    dv = p.transpose(-1, -2) @ dO
    ds = p * (dO @ vr.transpose(-1, -2) - (dO * out.double()).sum(-1, keepdim=True))
    dq, dk = ds @ kr * scale, ds.transpose(-1, -2) @ q.double() * scale

    def fold(x):
        return x.view(x.shape[0], kh, n // kh, *x.shape[2:]).sum(2)

    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


def recording_ops(log):
    """Stand-ins for the CUDA ops that compute exact attention on CPU and record what they were handed."""
    def note(op, **tensors):
        log.append((op, {name: (tuple(t.shape), t.dtype, t.is_contiguous(), t.stride()) for name, t in tensors.items()
                         if isinstance(t, torch.Tensor)}))

    def flash(q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=None):
        note("cuda_flash", q=q, k=k, v=v)
        out, lse, _ = _exact(q, k, v, is_causal=is_causal, scale=scale)
        z = torch.zeros(())
        return out.to(q.dtype), lse.float(), z, z, q.shape[2], k.shape[2], z, z, z

    def flash_backward(dO, q, k, v, out, lse, cq, ck, mq, mk, dropout_p, is_causal, seed, offset, scale=None):
        note("cuda_flash_backward", dO=dO, out=out, lse=lse)
        assert lse.is_contiguous() and lse.dtype == torch.float32 and lse.shape == q.shape[:3], lse.shape
        return _grads(dO, q, k, v, out, lse, None, is_causal, scale)

    def efficient(q, k, v, bias, compute_lse, dropout_p, is_causal, scale=None):
        note("cuda_efficient", q=q, k=k, v=v, bias=bias)
        assert bias.dtype == q.dtype and bias.stride(-2) % 16 == 0 and k.shape[1] == q.shape[1] and not is_causal
        out, lse, _ = _exact(q, k, v, bias=bias, scale=scale)
        padded = torch.zeros(*lse.shape[:-1], -(-lse.shape[-1] // 32) * 32)
        padded[..., : lse.shape[-1]] = lse
        return out.to(q.dtype), padded, torch.zeros(()), torch.zeros(())

    def efficient_backward(dO, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_mask, is_causal, scale=None):
        note("cuda_efficient_backward", dO=dO, out=out, lse=lse, bias=bias)
        t = q.shape[2]
        assert lse.is_contiguous() and lse.dtype == torch.float32 and lse.shape[-1] == -(-t // 32) * 32
        return (*_grads(dO, q, k, v, out, lse, bias, False, scale), None)

    return dict(cuda_flash=flash, cuda_flash_backward=flash_backward, cuda_efficient=efficient,
                cuda_efficient_backward=efficient_backward)


def ring_private_op_handoff(ctx, tile_rows):
    """Ring at CP=2 with the CUDA block kernels (exact CPU stand-ins): errors against one device, and the log."""
    from dist_mha import GroupQueryAttention
    from dist_mha.attention.kernels import blockwise
    from dist_mha.engine import context

    _, cp_group = ctx.grid(1, 2)
    log = []
    real = dict(vars(blockwise.OPS)), blockwise.choose, context.RING_TILE_BYTES, context.RING_MIN_TILE
    vars(blockwise.OPS).update(recording_ops(log))
    blockwise.choose = lambda *a, **k: blockwise.Kernels("cuda_flash", "cuda_efficient", "CUDA stand-ins")
    if tile_rows is not None:  # a budget so small that query tiles of `tile_rows` rows are used
        context.RING_TILE_BYTES, context.RING_MIN_TILE = 1, tile_rows
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, 11:] = False
    seg = torch.tensor([[0] * 5 + [1] * 6 + [2] * 5, [4] * 9 + [5] * 7])
    errors = {}
    try:
        for name, call in (("causal", dict(use_causal_mask=True)),
                           ("causal_padded", dict(use_causal_mask=True, value_mask=keep)),
                           ("segments", dict(use_causal_mask=True, segment_ids=seg))):
            r = compare_with_reference(None, dict(head_dim=8, num_query_heads=4, num_key_value_heads=2), (B, T, E),
                                       call_kwargs=call, layer_cls=GroupQueryAttention, cp_group=cp_group,
                                       check=False)
            errors[name] = max(r["max_abs_error"].values())
    finally:
        vars(blockwise.OPS).update(real[0])
        blockwise.choose, context.RING_TILE_BYTES, context.RING_MIN_TILE = real[1:]
    return errors, log


# -- initialisation agrees over TP x CP --------------------------------------------------------

def init_agrees_over_tp_x_cp(ctx):
    """Weights built with per-rank seeds vs built with every rank seeded like rank 0: `{module: equal}`."""
    from dist_mha import GroupQueryAttention, TransformerBlock
    from dist_mha.models.decoder import DecoderLM

    tp_group, cp_group = ctx.grid(2, 2)

    def build(seed):
        torch.manual_seed(seed)
        return {
            "layer": GroupQueryAttention(3, 4, 2, query_shape=E, tp_group=tp_group, cp_group=cp_group),
            "block": TransformerBlock(E, 4, tp_group=tp_group, cp_group=cp_group),
            "model": DecoderLM(20, 16, E, 4, 1, tp_group=tp_group, cp_group=cp_group),
        }

    per_rank, equal = build(100 + ctx.rank), build(100)
    return {name: all(torch.equal(a, b) for a, b in zip(per_rank[name].parameters(), equal[name].parameters()))
            for name in per_rank}


# -- ring under autocast --------------------------------------------------------------------------

def ring_under_autocast(ctx):
    """A bfloat16 layer's ring call inside and outside `torch.autocast`: (output equal, input gradient equal).

    Autocast changes nothing for a layer already in bfloat16 except what it lowers inside the attention:
    the ring's blocks and merge must run in float32 either way, or the backward (run outside autocast,
    in float32) recomputes against a forward LSE from bfloat16 scores.
    """
    from dist_mha import MultiHeadAttention
    from dist_mha.parallel import shard_sequence

    _, cp_group = ctx.grid(1, 2)
    x = shard_sequence(4 * torch.randn(B, T, E, generator=torch.Generator().manual_seed(3)), cp_group).bfloat16()
    results = []
    for autocast in (False, True):
        torch.manual_seed(0)
        # The math blocks (as dropout or key_dim != value_dim use them): their scores are matmuls autocast lowers.
        layer = MultiHeadAttention(4, 8, query_shape=E, cp_group=cp_group, dtype=torch.bfloat16,
                                   attention_backend="math")
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(xi, xi, use_causal_mask=True)
        out.float().square().sum().backward()
        results.append((out.detach(), xi.grad))
    (o1, g1), (o2, g2) = results
    return bool(torch.equal(o1, o2)), bool(torch.equal(g1, g2))


# -- host-side values on an NCCL-style group -----------------------------------------------------

@contextlib.contextmanager
def nccl_style(target):
    """`target` reports NCCL and its collectives refuse CPU tensors, as ProcessGroupNCCL does (they still run)."""
    from dist_mha.parallel import groups

    names = ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor")
    real = {n: getattr(dist, n) for n in names}
    real_backend, cached = dist.get_backend, dict(groups._CPU_GROUPS)

    def refusing(name):
        def call(tensor, *args, group=None, **kwargs):
            if group is target and tensor.device.type == "cpu":
                raise RuntimeError(f"No backend type associated with device type cpu ({name} of a CPU tensor on NCCL)")
            return real[name](tensor, *args, group=group, **kwargs)
        return call

    dist.get_backend = lambda g=None: "nccl" if g is target else real_backend(g)
    for n in names:
        setattr(dist, n, refusing(n))
    try:
        yield
    finally:
        dist.get_backend = real_backend
        for n in names:
            setattr(dist, n, real[n])
        groups._CPU_GROUPS.clear()
        groups._CPU_GROUPS.update(cached)


class _Data:
    """A data source of fixed batches that differ per DP rank."""

    def batch(self, step, dp_rank, batch_size):
        g = torch.Generator().manual_seed(10 * step + dp_rank)
        tokens = torch.randint(0, 9, (batch_size, 8), generator=g)
        return tokens, tokens, torch.rand(batch_size, 8, generator=g) < 0.5 + 0.25 * dp_rank


def step_batch_counts_on_an_nccl_style_dp_group(ctx):
    """`step_batch`'s global token counts with the DP group behaving as NCCL: `(scored, expected)`."""
    from dist_mha.parallel import build_parallel_state
    from dist_mha.train.batches import step_batch

    state = build_parallel_state(1, 1)  # DP = 4
    data = _Data()
    expected = sum(float(data.batch(0, r, 3)[2].sum()) for r in range(state.dp_size))
    with nccl_style(state.dp_group):
        batch = step_batch(data, 0, state, 3, torch.device("cpu"))
    return batch.scored, expected


# -- sum_grads with a parameter unused on one rank ------------------------------------------------

def sum_grads_with_a_missing_gradient(ctx):
    """Rank 0 uses both parameters, the others only the second: the summed gradients."""
    from dist_mha.train.batches import sum_grads

    group = ctx.group(2)
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(5))
    loss = (b * 2).sum() + ((a * 3).sum() if dist.get_rank(group) == 0 else 0)
    loss.backward()
    sum_grads([a, b], group)
    return a.grad.tolist(), b.grad.tolist()


# -- the ring on CUDA (runs where a GPU is) -----------------------------------------------------

def ring_on_cuda(ctx, masks):
    """Ring CP=2 on CUDA tensors (bf16 layer, B=2 rows x 4 heads of 64) against one float32 device.

    Returns `(kernels, {"output", "input_grad", "weight_grads"}: max relative errors)`.
    """
    from dist_mha import MultiHeadAttention
    from dist_mha.parallel import gather_sequence, shard_sequence

    _, cp_group = ctx.grid(1, 2)
    Tc, Ec = 256, 256
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, Tc, Ec, generator=g).cuda()
    probe = torch.randn(2, Tc, Ec, generator=g).cuda()
    call = {"use_causal_mask": True}
    if masks == "padding":
        keep = torch.ones(2, Tc, dtype=torch.bool)
        keep[1, 200:] = False
        call["value_mask"] = keep.cuda()
    elif masks == "packed":
        call["segment_ids"] = (torch.arange(Tc)[None].expand(2, Tc) * torch.tensor([[3], [5]]) // Tc).cuda()
    results = {}
    for name, group, dtype in (("ref", None, torch.float32), ("ring", cp_group, torch.bfloat16)):
        torch.manual_seed(0)
        layer = MultiHeadAttention(4, 64, query_shape=Ec, cp_group=group, device="cuda")
        xi = (x if group is None else shard_sequence(x, group)).to(dtype).requires_grad_()
        layer_call = layer.to(dtype)
        out = layer_call(xi, xi, **call)
        p = probe if group is None else shard_sequence(probe, group)
        (out.float() * p).sum().backward()
        grads = [w.grad.float() for w in layer.parameters()]
        if group is not None:
            out, xg = gather_sequence(out, group), gather_sequence(xi.grad, group)
            for w in grads:
                dist.all_reduce(w, group=group)
        else:
            xg = xi.grad
        results[name] = (out.float(), xg.float(), grads, layer.last_backend_reason)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    (o, xg, gw, _), (o2, xg2, gw2, why) = results["ref"], results["ring"]
    return why, {"output": rel(o2, o), "input_grad": rel(xg2, xg), "weight_grads": max(rel(a, b) for a, b in zip(gw2, gw))}

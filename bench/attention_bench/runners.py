"""Building a group's runners: how heavy a shape is, where the math backend cannot fit, smoke runs."""

from __future__ import annotations

import os

import torch

from .impls import Unsupported, attention_flops, make_impl, make_inputs
from .timing import Runner, _sync, attention_ops


def heaviness(shape, device):
    f = attention_flops(shape["B"], shape["T"], shape["T"], shape["E"], shape["N"], shape["E"] // shape["N"])
    # rough sustained rates: 2-core CPU ~1.5e11 (measured here), H100 ~3e14 FLOP/s
    rate = 3e14 if torch.device(device).type == "cuda" else 1.5e11
    sec = 3 * f / rate
    return "light" if sec < 0.02 else ("medium" if sec < 0.3 else "heavy")


def math_too_big(shape, variant, dtype, device):
    """The math path materialises (B, N, T, S) a few times; skip it where that cannot fit."""
    S = shape["S"] if variant == "cross" else shape["T"]
    elems = shape["B"] * shape["N"] * shape["T"] * S
    # scores + fp32 softmax + probs (+ mask) in forward, about as much again in backward
    est = elems * (torch.finfo(dtype).bits // 8 * 2 + 4) * 2
    if torch.device(device).type == "cuda":
        limit = 0.6 * torch.cuda.get_device_properties(0).total_memory
    else:
        limit = 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if est > limit:
        return f"skipped: the math backend would materialise ~{est / 2**30:.0f} GiB of (B,N,T,S) tensors (limit {limit / 2**30:.0f} GiB)"
    return None


def build_runners(names, shape, variant, device, dtype, mode, records_null):
    runners = []
    for name in names:
        if name == "dist_mha:math":
            why = math_too_big(shape, variant, dtype, device)
            if why:
                records_null[name] = why
                continue
        try:
            param_dtype = torch.float32 if mode == "autocast_bf16" else dtype
            in_dtype = torch.float32 if mode == "autocast_bf16" else dtype
            module, call, params = make_impl(name, shape, variant, device, param_dtype)
            if mode == "compiled":
                if name == "keras":
                    raise Unsupported("not compiled (keras layer, not an nn.Module)")
                module = torch.compile(module)
            autocast = ("cuda", torch.bfloat16) if mode == "autocast_bf16" else None
            r = Runner(name, module, call, params, make_inputs(shape, variant, device, in_dtype), autocast)
            # Smoke-run both phases once: a refusal or compile failure is recorded, not fatal.
            if mode == "compiled":
                from torch._dynamo.utils import counters

                breaks0 = dict(counters["graph_break"])
                graphs0 = counters["stats"]["unique_graphs"]
            r.reset_grads()
            r.fwdbwd()
            r.reset_grads()
            r.fwd()
            _sync(device)
            if mode == "compiled":
                new_breaks = {k: v - breaks0.get(k, 0) for k, v in counters["graph_break"].items() if v > breaks0.get(k, 0)}
                r.compile_info = {"graphs": counters["stats"]["unique_graphs"] - graphs0,
                                  "graph_breaks": sum(new_breaks.values()),
                                  "graph_break_reasons": [k.splitlines()[0][:200] for k in new_breaks]}
            if name.startswith("dist_mha:"):
                inner = getattr(module, "_orig_mod", module)
                r.backend_ran = inner.last_backend
            r.attention_ops = attention_ops(r)
            runners.append(r)
        except Unsupported as err:
            records_null[name] = str(err)
        except Exception as err:
            msg = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            if mode == "compiled":
                msg = "torch.compile failed: " + msg
            records_null[name] = msg[:2000]
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return runners

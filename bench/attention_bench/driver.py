"""The benchmark loop: shapes x modes x variants, each group timed, measured and written as records."""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time

import torch

from dist_mha.attention.kernels import flash as _flash

from .config import BASELINE, CPU_HEAVY, DEFAULT_SHAPES, ITERS, SHAPES, VARIANTS
from .impls import attention_flops, auto_backend, impl_names
from .load import OthersLoad, others_busy, wait_quiet
from .memory import cpu_memory, measure_mem_cuda
from .report import (
    _write_json,
    chart,
    evaluate_targets,
    machine_info,
    print_group,
    print_targets,
)
from .runners import build_runners, heaviness, math_too_big
from .timing import time_group

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/: the default results folder


def run(args):
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    groups = DEFAULT_SHAPES[device] if args.shapes is None else args.shapes
    if groups == "all":  # every shape meant for the device: "large" on CPU only when named explicitly
        groups = ["small", "large", "memory"] if device == "cuda" else ["small", "memory"]
    else:
        groups = groups.split(",")
    if args.compile:
        try:
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            if hasattr(torch._dynamo.config, "recompile_limit"):
                torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        except Exception:
            pass
    out_path = args.out or os.path.join(BENCH_DIR, "results",
                                        f"attention_{device}_{str(dtype).replace('torch.', '')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    doc = {"machine": machine_info(device, dtype), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "flop_formula": attention_flops.__doc__.strip(), "records": [], "targets": None}
    names = impl_names(device)
    if args.impls:
        names = [n for n in names if n in args.impls.split(",")]
        if BASELINE not in names:
            names.append(BASELINE)
    t_start = time.perf_counter()
    for group in groups:
        for shape in SHAPES[group][device]:
            _run_shape(args, doc, out_path, names, group, dict(shape), device, dtype)
    doc["total_seconds"] = time.perf_counter() - t_start
    doc["targets"] = evaluate_targets(doc["records"], device)
    _write_json(doc, out_path)
    print_targets(doc["targets"])
    print(f"\nwrote {out_path} ({len(doc['records'])} records, {doc['total_seconds']:.0f} s)")
    if not args.no_chart:
        chart(doc, os.path.splitext(out_path)[0] + ".png")
    return doc


def _run_shape(args, doc, out_path, names, group, shape, device, dtype):
    """Every (mode, variant) group of one shape; appends its records to `doc` and rewrites `out_path` after each."""
    variants = [v for v in shape.pop("variants", VARIANTS) if not args.variants or v in args.variants.split(",")]
    fixed_iters = shape.pop("iters", None)
    heavy = args.heaviness or heaviness(shape, device)
    warmup, rounds, iters = ITERS[heavy]
    if device == "cpu" and heavy == "heavy" and not args.heaviness:
        warmup, rounds, iters = CPU_HEAVY
    if fixed_iters and not args.heaviness:
        warmup, rounds, iters = fixed_iters
    modes = ["eager"]
    if args.compile:
        modes.append("compiled")
    if device == "cuda" and group != "memory" and not args.no_autocast:
        modes.append("autocast_bf16")
    mem_items = [(n, v) for v in variants for n in names
                 if not (n == "dist_mha:math" and math_too_big(shape, v, dtype, device))
                 and not (n == "keras" and device != "cpu")
                 and not (n == "dist_mha:flash" and not _flash.AVAILABLE)]
    cpu_mem, mem_method = ({}, None)
    if device == "cpu" and not args.no_memory:
        try:
            cpu_mem, mem_method = cpu_memory(shape, mem_items, dtype, torch.get_num_threads())
        except Exception as err:
            mem_method = f"failed: {type(err).__name__}: {err}"[:500]
    elif device == "cuda":
        mem_method = "torch.cuda.max_memory_allocated - memory_allocated (after reset_peak_memory_stats)"
    # Mode-major: every eager row is written before the first compile, so a
    # run cut short by a timeout still has them (the targets read them).
    for mode, variant in [(m, v) for m in modes for v in variants]:
        if mode == "compiled" and variant not in args.compile_variants.split(","):
            continue
        if mode == "autocast_bf16" and variant != "self":
            continue
        mode_names = names
        if mode == "autocast_bf16":
            mode_names = [n for n in names if n in ("dist_mha:sdpa", "dist_mha:flash", "torch_mha", BASELINE)]
        if mode == "compiled":
            mode_names = [n for n in names if n in ("dist_mha:sdpa", "dist_mha:flash", "torch_mha", BASELINE)]
        nulls = {}
        t0 = time.perf_counter()
        runners = build_runners(mode_names, shape, variant, device, dtype, mode, nulls)
        runners, busy_before, busy_during, fwd, fb = _time_quietest(args, runners, device, warmup, rounds, iters, nulls)
        rows = _group_rows(doc, shape, variant, mode, device, dtype, runners, nulls, fwd, fb, warmup,
                           busy_before, busy_during, cpu_mem, mem_method)
        doc["records"] += rows
        print_group(shape, variant, mode, rows, time.perf_counter() - t0)
        if device == "cpu" and max(busy_before, busy_during) > 0.2:
            print(f"   WARNING: other processes used {busy_before:.2f} cores before / {busy_during:.2f} cores "
                  f"during this group's timing (of {os.cpu_count()}); these timings are contaminated. "
                  "Rerun on a quiet machine or with --wait-quiet SECONDS.")
        del runners
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        _write_json(doc, out_path)


def _time_quietest(args, runners, device, warmup, rounds, iters, nulls):
    """Times one group (fwd, then fwd+bwd); on CPU re-times it up to --retries times while other
    processes were busy and keeps the quietest attempt.

    Returns (the runners that survived, busy_before, busy_during, fwd samples, fwd+bwd samples).
    """
    attempts = []
    for attempt in range(1 + (args.retries if device == "cpu" else 0)):
        if device != "cpu":  # skip the 0.3 s idle probe on GPU (the load is still recorded)
            busy_before = 0.0
        else:
            busy_before = wait_quiet(args.wait_quiet) if args.wait_quiet else others_busy(0.3)
        load = OthersLoad()
        for r in runners:
            r.faults = {}
        fwd = time_group(runners, "fwd", device, warmup, rounds, iters, nulls)
        fb = time_group(runners, "fwdbwd", device, warmup, rounds, iters, nulls)
        busy_during = load.stop()
        attempts.append((max(busy_before, busy_during), busy_before, busy_during, fwd, fb,
                         {r.name: dict(r.faults) for r in runners}))
        if device != "cpu" or max(busy_before, busy_during) <= 0.2:
            break
        print(f"   (attempt {attempt + 1}: other processes used {busy_during:.2f} cores; retrying)")
    _, busy_before, busy_during, fwd, fb, faults = min(attempts, key=lambda a: a[0])
    runners = [r for r in runners if r.name in fb]
    for r in runners:
        r.faults = faults.get(r.name, {})
    return runners, busy_before, busy_during, fwd, fb


def _group_rows(doc, shape, variant, mode, device, dtype, runners, nulls, fwd, fb, warmup,
                busy_before, busy_during, cpu_mem, mem_method):
    """The records of one group: one per timed runner, a null one per refusal, ratios to the baselines."""
    S = shape["S"] if variant == "cross" else shape["T"]
    H = shape["E"] // shape["N"]
    flops = attention_flops(shape["B"], shape["T"], S, shape["E"], shape["N"], H, causal=variant == "causal")
    try:
        if mode == "autocast_bf16":
            auto = auto_backend(shape, variant, device, torch.float32, ("cuda", torch.bfloat16))
        else:
            auto = auto_backend(shape, variant, device, dtype)
    except Exception as err:
        auto = f"error: {err}"
    base_rows = {}
    rows = []
    for r in runners:
        rec = dict(shape=shape["name"], dims=dict(B=shape["B"], T=shape["T"], S=S, E=shape["E"], N=shape["N"], H=H),
                   variant=variant, impl=r.name, mode=mode,
                   dtype=str(dtype).replace("torch.", "") if mode != "autocast_bf16" else "float32+autocast(bfloat16)",
                   device=device, flops_fwd=flops, flops_fwdbwd=3 * flops,
                   fwd_ms=statistics.median(fwd[r.name]), fwdbwd_ms=statistics.median(fb[r.name]),
                   fwd_ms_min=min(fwd[r.name]), fwdbwd_ms_min=min(fb[r.name]),
                   n_timed=len(fwd[r.name]), warmup=warmup, auto_backend=auto, reason=None,
                   others_cpu_cores_before=round(busy_before, 3), others_cpu_cores_during=round(busy_during, 3))
        rec["fwd_tflops"] = flops / (rec["fwd_ms"] * 1e-3) / 1e12
        rec["fwdbwd_tflops"] = 3 * flops / (rec["fwdbwd_ms"] * 1e-3) / 1e12
        if device == "cpu":
            rec["minor_faults_per_call"] = {ph: round(r.faults.get(ph, 0) / max(1, len(d[r.name])), 1)
                                            for ph, d in (("fwd", fwd), ("fwdbwd", fb))}
        if hasattr(r, "backend_ran"):
            rec["backend_ran"] = r.backend_ran
        rec["attention_ops"] = getattr(r, "attention_ops", None)
        if hasattr(r, "compile_info"):
            rec["compile"] = r.compile_info
        if mode == "eager":
            if device == "cuda":
                try:
                    rec["peak_mem_fwd_bytes"] = measure_mem_cuda(r, "fwd")
                    rec["peak_mem_fwdbwd_bytes"] = measure_mem_cuda(r, "fwdbwd")
                except Exception as err:  # OOM, or a kernel error: record it, keep going
                    rec["peak_mem_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    torch.cuda.empty_cache()
            else:
                m = cpu_mem.get((r.name, variant), {})
                rec["peak_mem_fwd_bytes"] = m.get("peak_mem_fwd_bytes")
                rec["peak_mem_fwdbwd_bytes"] = m.get("peak_mem_fwdbwd_bytes")
                if "error" in m:
                    rec["peak_mem_error"] = m["error"]
            rec["mem_method"] = mem_method
        rows.append(rec)
        if r.name == BASELINE:
            base_rows = rec
    for name, why in nulls.items():
        rows.append(dict(shape=shape["name"], variant=variant, impl=name, mode=mode, device=device,
                         dtype=str(dtype).replace("torch.", ""), fwd_ms=None, fwdbwd_ms=None,
                         fwd_tflops=None, fwdbwd_tflops=None, reason=why, auto_backend=auto))
    eager_base = next((x for x in doc["records"] if x["shape"] == shape["name"] and x["variant"] == variant
                       and x["impl"] == BASELINE and x["mode"] == "eager" and x.get("fwd_ms")), None)
    if mode == "eager":
        eager_base = base_rows or None
    for rec in rows:
        for ph in ("fwd", "fwdbwd"):
            v = rec.get(f"{ph}_ms")
            b = base_rows.get(f"{ph}_ms") if base_rows else None
            rec[f"{ph}_ratio"] = v / b if v and b else None
            eb = eager_base.get(f"{ph}_ms") if eager_base else None
            rec[f"{ph}_ratio_vs_eager_baseline"] = v / eb if v and eb else None
        pm, bm = rec.get("peak_mem_fwdbwd_bytes"), base_rows.get("peak_mem_fwdbwd_bytes") if base_rows else None
        rec["peak_mem_fwdbwd_ratio"] = pm / bm if pm is not None and bm else None
    return rows

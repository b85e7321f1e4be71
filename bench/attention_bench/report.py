"""Reporting: machine info, the printed tables, the JSON file, the targets and the chart."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch

from dist_mha.attention.kernels import flash as _flash

from .config import BASELINE


def machine_info(device, dtype):
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "flash_attn_available": _flash.AVAILABLE,
        "flash_attn_builds": [f"{v.name} ({v.module})" for v in _flash.VARIANTS],
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        info["cpu_model"] = platform.processor()
    if torch.device(device).type == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        info["device_name"] = info["cpu_model"]
    try:
        import keras

        info["keras"] = keras.__version__
    except Exception as err:
        info["keras"] = f"not importable: {type(err).__name__}"
    return info


def fmt_ms(v):
    return "-" if v is None else (f"{v:8.3f}" if v < 100 else f"{v:8.1f}")


def _write_json(doc, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def print_group(shape, variant, mode, rows, secs):
    print(f"\n== {shape['name']} B={shape['B']} T={shape['T']} S={rows[0].get('dims', {}).get('S', '?')} "
          f"E={shape['E']} N={shape['N']}  variant={variant}  mode={mode}  ({secs:.1f} s)")
    print(f"   {'impl':<16}{'fwd ms':>9}{'x base':>8}{'fwd+bwd ms':>12}{'x base':>8}{'TFLOP/s':>9}{'peak MiB':>10}{'x base':>8}  note")
    for r in rows:
        if r.get("fwd_ms") is None:
            print(f"   {r['impl']:<16}{'null':>9}  {r['reason']}")
            continue
        pm = r.get("peak_mem_fwdbwd_bytes")
        pm_s = f"{pm / 2**20:10.1f}" if pm is not None else f"{'-':>10}"
        pr = r.get("peak_mem_fwdbwd_ratio")
        note = r.get("backend_ran") or ""
        if r.get("compile"):
            note += f" graphs={r['compile']['graphs']} breaks={r['compile']['graph_breaks']}"
        rat = lambda v: f"{v:8.2f}" if v is not None else f"{'-':>8}"  # noqa: E731
        print(f"   {r['impl']:<16}{fmt_ms(r['fwd_ms']):>9}{rat(r['fwd_ratio'])}{fmt_ms(r['fwdbwd_ms']):>12}"
              f"{rat(r['fwdbwd_ratio'])}{r['fwdbwd_tflops']:9.3f}{pm_s}{rat(pr)}  {note}")


# ----------------------------------------------------------------------------- targets
def _find(records, **kw):
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()) and r.get("fwd_ms") is not None:
            return r
    return None


def evaluate_targets(records, device):
    """The targets of the performance issue (see bench/README.md), from the records that can answer them.

    GPU targets read bfloat16 eager rows, CPU targets float32 eager rows; an empty list means
    nothing here could be evaluated.
    """
    out = []
    records = [r for r in records if r.get("dtype") == ("bfloat16" if device == "cuda" else "float32")]
    if device == "cuda":
        base = _find(records, shape="large", variant="self", mode="eager", impl=BASELINE)
        auto = base and base.get("auto_backend")
        dm = base and _find(records, shape="large", variant="self", mode="eager", impl=f"dist_mha:{auto}")
        tm = _find(records, shape="large", variant="self", mode="eager", impl="torch_mha")
        if dm and tm:
            sp = tm["fwdbwd_ms"] / dm["fwdbwd_ms"]
            out.append(dict(target="GPU bf16 self large fwd+bwd speed vs torch_mha >= 1.10x", impl=dm["impl"],
                            value=sp, ok=sp >= 1.10))
        if dm and base:
            sp = base["fwdbwd_ms"] / dm["fwdbwd_ms"]
            out.append(dict(target="GPU bf16 self large fwd+bwd speed vs fused_baseline >= 1.0x", impl=dm["impl"],
                            value=sp, ok=sp >= 1.0))
        for r in records:
            if r["shape"] == "memory_T16384" and r["mode"] == "eager" and r["impl"] == f"dist_mha:{r.get('auto_backend')}" \
                    and r.get("peak_mem_fwdbwd_ratio") is not None:
                out.append(dict(target=f"GPU peak memory T=16k ({r['variant']}) <= 1.1x fused_baseline", impl=r["impl"],
                                value=r["peak_mem_fwdbwd_ratio"], ok=r["peak_mem_fwdbwd_ratio"] <= 1.1))
    else:
        for r in records:
            if r["shape"] == "small" and r["mode"] == "eager" and r["impl"] == "dist_mha:sdpa" and r.get("fwd_ratio"):
                for ph in ("fwd", "fwdbwd"):
                    out.append(dict(target=f"CPU small {r['variant']} {ph} time <= 1.10x fused_baseline",
                                    impl=r["impl"], value=r[f"{ph}_ratio"], ok=r[f"{ph}_ratio"] <= 1.10))
    return out


def check_targets(paths, device, expected=3):
    """Evaluates the targets from result files (gpu_check.sh's last step); returns the exit status.

    0: every target met; 3: one missed, or fewer than `expected` could be
    evaluated (rows missing, e.g. a benchmark step timed out).
    """
    records = []
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                records += json.load(f)["records"]
        else:
            print(f"   missing {path}")
    for r in records:  # which kernels the target rows ran, for the report
        if r.get("shape") == "large" and r.get("variant") == "self" and r.get("mode") == "eager" and r.get("fwdbwd_ms"):
            print(f"   large self eager {r['impl']:<16} fwd+bwd {r['fwdbwd_ms']:8.3f} ms {r['fwdbwd_tflops']:7.1f} TFLOP/s "
                  f"ops={r.get('attention_ops')}")
    targets = evaluate_targets(records, device)
    print_targets(targets)
    if len(targets) < expected:
        print(f"   [MISS] only {len(targets)} of >= {expected} targets could be evaluated (rows missing)")
        return 3
    return 0 if all(t["ok"] for t in targets) else 3


def print_targets(targets):
    if not targets:
        return
    print("\nTargets:")
    for t in targets:
        print(f"   [{'PASS' if t['ok'] else 'MISS'}] {t['target']}: {t['impl']} {t['value']:.3f}")


# ----------------------------------------------------------------------------- chart
def chart(doc, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:
        print(f"chart skipped: matplotlib not importable ({type(err).__name__}: {err})")
        return None
    rows = [r for r in doc["records"] if r.get("fwdbwd_ratio") is not None]
    groups = []
    for r in rows:
        key = (r["shape"], r["variant"], r["mode"])
        if key not in groups:
            groups.append(key)
    impls = []
    for r in rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    width = 0.8 / max(1, len(impls))
    CLIP = min(3.0, max(r["fwdbwd_ratio"] for r in rows) * 1.05) if rows else 3.0
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(groups) + 2), 4.8))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for g, key in enumerate(groups):
            r = next((r for r in rows if (r["shape"], r["variant"], r["mode"]) == key and r["impl"] == impl), None)
            if r is not None:
                xs.append(g + (k - (len(impls) - 1) / 2) * width)
                ys.append(r["fwdbwd_ratio"])
        ax.bar(xs, [min(y, CLIP) for y in ys], width, label=impl)
        for x_, y_ in zip(xs, ys):
            if y_ > CLIP:
                ax.text(x_, CLIP, f"{y_:.1f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_ylim(0, CLIP * 1.12)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.1, color="r", lw=0.8, ls="--", label="1.10x baseline")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(["\n".join(k) for k in groups], fontsize=7)
    ax.set_ylabel("fwd+bwd time / fused_baseline (lower is faster)\n(bars clipped; value printed)", fontsize=8)
    m = doc["machine"]
    ax.set_title(f"{m['device_name']} | {m['dtype']} | torch {m['torch']}", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return path

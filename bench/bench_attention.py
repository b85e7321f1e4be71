"""Attention benchmark: dist_mha vs torch.nn.MultiheadAttention vs a hand-fused
SDPA baseline vs Keras 3's MultiHeadAttention, in one process and one run.

    python bench/bench_attention.py                         # CPU defaults (< ~3 min on 2 cores)
    python bench/bench_attention.py --device cuda --shapes large --compile
    python bench/bench_attention.py --device cuda --shapes memory
    python bench/bench_attention.py --help

What is measured, for every (shape, variant, implementation, mode):

* ``fwd_ms``     median wall time of one forward call under ``torch.no_grad()``.
* ``fwdbwd_ms``  median wall time of forward + ``out.backward(grad)`` with the
                 inputs requiring grad (so dX is computed, as inside a model) and
                 every ``.grad`` reset to None before each iteration (outside the
                 timed region).
  Timing: W untimed warm-up calls per implementation, then R round-robin
  rounds; each round times I consecutive calls of every implementation of the
  group in turn, so slow drift of the machine hits all of them alike. Median
  over all R*I timed calls (``n_timed``; ``*_ms_min`` is the fastest call).
  (W, R, I) = (5, 10, 5) for light shapes (small), (2, 5, 2) medium, (1, 3, 1)
  heavy; CPU memory shapes (1, 2, 1) since they exist for the memory numbers
  (``--heaviness`` overrides). CPU: ``time.perf_counter`` around each call.
  CUDA: a pair of ``torch.cuda.Event`` around each call, one ``synchronize``
  at the end of each implementation's turn.
* ``others_cpu_cores_before`` / ``_during`` -- CPU cores used by *other*
  processes (from /proc/stat minus this process tree) just before and during a
  group's timing. On a shared 2-core machine a group with > 0.2 is
  contaminated (a warning is printed); ``--wait-quiet S`` waits up to S seconds
  for an idle machine before each group and ``--retries N`` re-times a
  contaminated group up to N times, keeping the quietest attempt.
* ``minor_faults_per_call`` (CPU) -- fresh pages the process got from the OS per
  call. glibc returns freed memory to the OS depending on allocation history,
  and re-faulting it costs ~0.1-0.5 ms per call at the small shape: when two
  implementations differ by a few percent, look here before blaming the math.
* ``*_ratio``    time / the hand-fused baseline's time for the same shape,
                 variant and mode, measured in the same run (< 1 is faster
                 than the baseline). ``*_ratio_vs_eager_baseline`` divides
                 compiled/autocast rows by the eager baseline instead.
* ``*_tflops``   achieved TFLOP/s = counted FLOPs / median time, with the
                 FLOPs counted explicitly (not profiled):

      projections  Q: 2*B*T*Dq*(N*H)   K: 2*B*S*Dk*(N*H)   V: 2*B*S*Dv*(N*Hv)
                   (self-attention, Dq=Dk=Dv=E, N*H=N*Hv=E: 2*B*T*E*3E)
      scores       2*B*N*T*S*H
      weighted sum 2*B*N*T*S*Hv
      output proj  2*B*T*(N*Hv)*E
      forward      = sum of the above; causal: scores and weighted sum halved
                     (a causal kernel skips the upper triangle); padded:
                     nominal (dense) count, no discount for padding
      backward     = 2 x forward, so fwd+bwd = 3 x forward

* ``peak_mem_*_bytes`` extra memory at the peak of one forward (no_grad) and of
  one forward+backward, above what was live just before the call (parameters
  and inputs are already allocated and are not counted; gradients are).
  CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated() -
  memory_allocated()`` (caching-allocator bytes actually handed to tensors).
  CPU: resident-set size, measured in a fresh subprocess per shape (``--mem-worker``)
  started with ``MALLOC_MMAP_THRESHOLD_=65536`` so every tensor >= 64 KiB is
  its own mmap that glibc returns to the OS on free (no allocator history
  between measurements). Per measurement: one untimed warm-up call (oneDNN
  primitives, thread pools, lazy init), ``gc.collect()``, reset the kernel's
  peak-RSS watermark (``echo 5 > /proc/self/clear_refs``), read ``VmRSS``, run,
  read ``VmHWM``; the number is ``VmHWM - VmRSS_before``. It therefore counts
  every byte the call made resident (tensors, oneDNN scratch, thread stacks
  first touched) and is exact to a page, but includes small non-tensor
  allocations (~1-10 MiB noise). If ``clear_refs`` is not writable the parent
  falls back to one subprocess per measurement without warm-up (``ru_maxrss``
  delta), noted as ``mem_method`` in the JSON.

Implementations:

* ``dist_mha:sdpa`` / ``dist_mha:math`` / ``dist_mha:flash`` -- ``dist_mha.MultiHeadAttention``
  at TP=1 with ``attention_backend=`` forced, built eagerly with ``query_shape=``.
  A backend that refuses the call (or flash-attn not installed:
  ``dist_mha.kernels.flash.AVAILABLE`` False) gets a null record with the reason.
  ``auto_backend`` in each record says what the default (``flash_attention=None``)
  picks for that call, ``backend_ran`` what the forced layer reported.
* ``torch_mha`` -- ``torch.nn.MultiheadAttention(batch_first=True)``, ``need_weights=False``.
* ``fused_baseline`` -- one ``nn.Linear(E, 3E)`` for QKV (cross-attention: ``nn.Linear(E, E)``
  for Q + ``nn.Linear(E, 2E)`` for KV), ``F.scaled_dot_product_attention``, ``nn.Linear(E, E)``.
* ``keras`` -- ``keras.layers.MultiHeadAttention`` on the torch backend (CPU only);
  its weights are torch Parameters, so torch autograd does the backward.

Variants: ``self`` (query = value = key, same tensor); ``cross`` (S != T);
``causal`` (dist_mha/keras ``use_causal_mask=True``, baseline ``is_causal=True``,
torch_mha ``attn_mask=<causal>, is_causal=True``); ``padded`` (key padding:
dist_mha/keras ``value_mask``, torch_mha ``key_padding_mask``, baseline a bool
``attn_mask`` of shape (B, 1, 1, S)). A competitor that cannot run a variant
gets a record with null numbers and ``reason``.

Modes: ``eager``; ``compiled`` (``--compile``: ``torch.compile`` of the module
for dist_mha sdpa/flash, torch_mha and the baseline, self-attention by default,
see ``--compile-variants``; a failure is recorded with its error; ``compile``
in the record gives the number of graphs and graph breaks with their reasons);
``autocast_bf16`` (CUDA only: float32 weights and inputs under
``torch.autocast("cuda", torch.bfloat16)``, self-attention, non-memory shapes).

Output: JSON (``--out``; machine info + one record per row) and, when matplotlib
is importable, a PNG next to it with the fwd+bwd time ratio to the baseline.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dist_mha import MultiHeadAttention  # noqa: E402
from dist_mha.kernels import flash as _flash  # noqa: E402

BASELINE = "fused_baseline"
VARIANTS = ("self", "cross", "causal", "padded")

# name -> per-device list of shape dicts. T/S/B/E/N: see the module docstring.
SHAPES = {
    "small": {
        "cpu": [dict(name="small", B=8, T=128, S=96, E=256, N=8)],
        "cuda": [dict(name="small", B=8, T=128, S=96, E=256, N=8)],
    },
    "large": {
        "cpu": [dict(name="large", B=8, T=2048, S=1024, E=4096, N=32)],
        "cuda": [dict(name="large", B=8, T=2048, S=1024, E=4096, N=32)],
    },
    "memory": {
        "cpu": [dict(name="memory_T1024", B=1, T=1024, S=512, E=256, N=8, variants=("self", "causal")),
                dict(name="memory_T4096", B=1, T=4096, S=2048, E=256, N=8, variants=("self",))],
        "cuda": [dict(name=f"memory_T{t}", B=1, T=t, S=t // 2, E=4096, N=32, variants=("self", "causal"), iters=(1, 3, 1))
                 for t in (4096, 8192, 16384)],
    },
}
DEFAULT_SHAPES = {"cpu": "small,memory", "cuda": "large,memory"}
# Iteration counts (warmup, rounds, iters per round) by how heavy a shape is.
ITERS = {"light": (5, 10, 5), "medium": (2, 5, 2), "heavy": (1, 3, 1)}
CPU_HEAVY = (1, 2, 1)  # CPU memory shapes: these exist for the memory numbers, keep the run short


# ----------------------------------------------------------------------------- FLOPs
def attention_flops(B, T, S, E, N, H, Hv=None, causal=False):
    """Forward FLOPs (multiply-add = 2) of one multi-head attention call.

    Q/K/V projections 2*B*T*E*N*H + 2*B*S*E*N*H + 2*B*S*E*N*Hv (self-attention:
    2*B*T*E*3E), scores 2*B*N*T*S*H, weighted sum 2*B*N*T*S*Hv, output
    projection 2*B*T*N*Hv*E. Causal halves the two attention terms.
    Backward is counted as 2x forward (fwd+bwd = 3x).
    """
    Hv = H if Hv is None else Hv
    proj = 2 * B * T * E * N * H + 2 * B * S * E * N * H + 2 * B * S * E * N * Hv
    attn = 2 * B * N * T * S * H + 2 * B * N * T * S * Hv
    if causal:
        attn //= 2
    out = 2 * B * T * N * Hv * E
    return proj + attn + out


# ----------------------------------------------------------------------------- implementations
class FusedBaseline(nn.Module):
    """The hand-fused reference: fused QKV (or Q + fused KV) Linear, SDPA, output Linear."""

    def __init__(self, E, N, cross, device, dtype):
        super().__init__()
        self.N, self.H = N, E // N
        if cross:
            self.q = nn.Linear(E, E, device=device, dtype=dtype)
            self.kv = nn.Linear(E, 2 * E, device=device, dtype=dtype)
        else:
            self.qkv = nn.Linear(E, 3 * E, device=device, dtype=dtype)
        self.out = nn.Linear(E, E, device=device, dtype=dtype)

    def forward(self, x, y=None, attn_mask=None, is_causal=False):
        B, T, E = x.shape
        N, H = self.N, self.H
        if y is None:
            q, k, v = self.qkv(x).view(B, T, 3, N, H).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            S = y.shape[1]
            q = self.q(x).view(B, T, N, H).transpose(1, 2)
            k, v = self.kv(y).view(B, S, 2, N, H).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out(o.transpose(1, 2).reshape(B, T, E))


def _keras():
    import keras  # noqa: F401  (KERAS_BACKEND=torch set at the top)

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"keras backend is {keras.backend.backend()!r}, not torch (set KERAS_BACKEND=torch)")
    return keras


def impl_names(device):
    # dist_mha:flash is listed everywhere; without the package it gets a null record saying so.
    return ["dist_mha:sdpa", "dist_mha:math", "dist_mha:flash", "torch_mha", BASELINE, "keras"]


class Unsupported(Exception):
    """An implementation cannot run a variant; the message is the recorded reason."""


def make_inputs(shape, variant, device, dtype, requires_grad=True):
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, S, E = shape["B"], shape["T"], shape["S"], shape["E"]
    x = torch.randn(B, T, E, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    inp = {"x": x}
    if variant == "cross":
        inp["y"] = torch.randn(B, S, E, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    if variant == "padded":
        # Row b keeps its first T - b*T/(2B) keys: row 0 unpadded, the last about half; never empty.
        lens = torch.tensor([T - b * T // (2 * B) for b in range(B)])
        inp["keep"] = (torch.arange(T)[None, :] < lens[:, None]).to(device)
    if variant == "causal":
        inp["causal_float"] = torch.nn.Transformer.generate_square_subsequent_mask(T, device=device, dtype=dtype)
    return inp


def make_impl(name, shape, variant, device, param_dtype):
    """Returns `(module, call(module, inputs) -> output tensor, params list)`.

    Raises Unsupported with the reason where the implementation cannot do it.
    """
    E, N = shape["E"], shape["N"]
    H = E // N
    torch.manual_seed(0)
    if name == "dist_mha:flash" and not _flash.AVAILABLE:
        raise Unsupported("flash-attn is not installed (dist_mha.kernels.flash.AVAILABLE is False)")
    if name.startswith("dist_mha:"):
        backend = name.split(":")[1]
        backend = None if backend == "auto" else backend
        m = MultiHeadAttention(N, H, query_shape=E, value_shape=E, attention_backend=backend,
                               device=device, dtype=param_dtype)
        calls = {
            "self": lambda m, i: m(i["x"], i["x"]),
            "cross": lambda m, i: m(i["x"], i["y"]),
            "causal": lambda m, i: m(i["x"], i["x"], use_causal_mask=True),
            "padded": lambda m, i: m(i["x"], i["x"], value_mask=i["keep"]),
        }
        return m, calls[variant], list(m.parameters())
    if name == "torch_mha":
        m = nn.MultiheadAttention(E, N, batch_first=True, device=device, dtype=param_dtype)
        calls = {
            "self": lambda m, i: m(i["x"], i["x"], i["x"], need_weights=False)[0],
            "cross": lambda m, i: m(i["x"], i["y"], i["y"], need_weights=False)[0],
            # is_causal is only a hint in nn.MultiheadAttention: the mask must be passed too;
            # with need_weights=False and no key padding it drops the mask and uses SDPA's is_causal.
            "causal": lambda m, i: m(i["x"], i["x"], i["x"], attn_mask=i["causal_float"], is_causal=True,
                                     need_weights=False)[0],
            "padded": lambda m, i: m(i["x"], i["x"], i["x"], key_padding_mask=~i["keep"], need_weights=False)[0],
        }
        return m, calls[variant], list(m.parameters())
    if name == BASELINE:
        m = FusedBaseline(E, N, variant == "cross", device, param_dtype)
        calls = {
            "self": lambda m, i: m(i["x"]),
            "cross": lambda m, i: m(i["x"], i["y"]),
            "causal": lambda m, i: m(i["x"], is_causal=True),
            "padded": lambda m, i: m(i["x"], attn_mask=i["keep"][:, None, None, :]),
        }
        return m, calls[variant], list(m.parameters())
    if name == "keras":
        if torch.device(device).type != "cpu":
            raise Unsupported("keras is benchmarked on CPU only")
        try:
            keras = _keras()
        except Exception as err:  # not installed / wrong backend
            raise Unsupported(f"keras not importable: {type(err).__name__}: {err}") from err
        dtype_name = str(param_dtype).replace("torch.", "")
        m = keras.layers.MultiHeadAttention(N, H, dtype=dtype_name)
        calls = {
            "self": lambda m, i: m(i["x"], i["x"]),
            "cross": lambda m, i: m(i["x"], i["y"]),
            "causal": lambda m, i: m(i["x"], i["x"], use_causal_mask=True),
            "padded": lambda m, i: m(i["x"], i["x"], value_mask=i["keep"]),
        }
        # Build on a tiny batch of the right feature sizes; keras variables hold torch Parameters.
        tiny = {"x": torch.zeros(1, 2, E, device=device, dtype=param_dtype)}
        tiny["y"] = tiny["x"]
        with torch.no_grad():
            m(tiny["x"], tiny["y"])
        params = [w.value for w in m.weights]
        return m, calls[variant], params
    raise ValueError(name)


def auto_backend(shape, variant, device, dtype, autocast=None):
    """What dist_mha's default dispatch (flash_attention=None) picks for this call."""
    inp = make_inputs(dict(shape, B=1), variant, device, dtype, requires_grad=False)
    m, call, params = make_impl("dist_mha:auto", shape, variant, device, dtype)
    Runner("auto", m, call, params, inp, autocast).fwd()
    return m.last_backend


# ----------------------------------------------------------------------------- timing
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One implementation's forward and fwd+bwd step, with grads reset between steps."""

    def __init__(self, name, module, call, params, inputs, autocast=None):
        self.name, self.module, self.call, self.params, self.inputs = name, module, call, params, inputs
        self.autocast = autocast
        self.grad_out = None
        self.faults = {}

    def _ctx(self):
        if self.autocast is None:
            return _Null()
        return torch.autocast(self.autocast[0], dtype=self.autocast[1])

    def reset_grads(self):
        for p in self.params:
            p.grad = None
        for t in self.inputs.values():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None

    def fwd(self):
        with torch.no_grad(), self._ctx():
            return self.call(self.module, self.inputs)

    def fwdbwd(self):
        with self._ctx():
            out = self.call(self.module, self.inputs)
        if self.grad_out is None or self.grad_out.shape != out.shape or self.grad_out.dtype != out.dtype:
            self.grad_out = torch.ones_like(out) / out.numel() ** 0.5
        out.backward(self.grad_out)
        return out


def attention_ops(runner):
    """The fused attention ops one fwd+bwd call dispatches (which SDPA kernel torch picked).

    Read from the profiler's CPU-side op names (no CUPTI needed), e.g.
    `aten::_scaled_dot_product_cudnn_attention` and its backward; None if the
    profiler fails.
    """
    try:
        from torch.profiler import ProfilerActivity, profile

        runner.reset_grads()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.fwdbwd()
        runner.reset_grads()
        return sorted({e.name for e in prof.events() if e.name.startswith("aten::_") and "attention" in e.name})
    except Exception as err:  # the profiler is a diagnostic; it must not cost the run
        return [f"profiler failed: {type(err).__name__}: {err}"[:200]]


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def time_group(runners, phase, device, warmup, rounds, iters, failures):
    """Round-robin timing of `phase` ("fwd" / "fwdbwd"); returns {name: [ms, ...]}.

    A runner that raises (e.g. CUDA OOM mid-run) is dropped from `runners` and its
    error goes to `failures[name]`.
    """
    cuda = torch.device(device).type == "cuda"
    samples = {r.name: [] for r in runners}

    def drop(r, err):
        failures[r.name] = f"{phase} failed: {type(err).__name__}: {str(err).strip()[:500]}"
        runners.remove(r)
        samples.pop(r.name, None)
        if cuda:
            torch.cuda.empty_cache()

    for r in list(runners):
        try:
            for _ in range(warmup):
                r.reset_grads()
                getattr(r, phase)()
            _sync(device)
        except Exception as err:
            drop(r, err)
    for _ in range(rounds):
        for r in list(runners):
            step = getattr(r, phase)
            try:
                if cuda:
                    events = []
                    for _ in range(iters):
                        r.reset_grads()
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        step()
                        e.record()
                        events.append((s, e))
                    torch.cuda.synchronize()
                    samples[r.name] += [s.elapsed_time(e) for s, e in events]
                else:
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    for _ in range(iters):
                        r.reset_grads()
                        t0 = time.perf_counter()
                        step()
                        samples[r.name].append((time.perf_counter() - t0) * 1e3)
                    # minor page faults (fresh pages from the OS): allocator history, not the math
                    r.faults[phase] = r.faults.get(phase, 0) + resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            except Exception as err:
                drop(r, err)
    return samples


# ----------------------------------------------------------------------------- machine load
def _proc_jiffies(stat_text):
    fields = stat_text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # utime stime cutime cstime


def _cpu_jiffies():
    """(busy jiffies of the whole machine, jiffies of this process and its live descendants).

    Descendants (e.g. RankPool workers) are ours, not "other" load.
    """
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle and iowait
    stats, parent = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    txt = f.read()
            except OSError:
                continue
            stats[int(d)] = txt
            parent[int(d)] = int(txt.rsplit(")", 1)[1].split()[1])
    mine, todo = 0, [os.getpid()]
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        mine += _proc_jiffies(stats[pid])
        todo += [c for c, pp in parent.items() if pp == pid]
    return busy, mine


class OthersLoad:
    """Average number of CPU cores used by *other* processes between start() and stop().

    Timings on a shared 2-core machine are only meaningful when this is ~0;
    every record carries it (``others_cpu_cores``).
    """

    def __init__(self):
        self.start()

    def start(self):
        self._t, (self._busy, self._mine) = time.monotonic(), _cpu_jiffies()

    def stop(self):
        busy, mine = _cpu_jiffies()
        dt = max(time.monotonic() - self._t, 1e-6)
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, ((busy - self._busy) - (mine - self._mine)) / hz / dt)


def others_busy(interval=0.5):
    load = OthersLoad()
    time.sleep(interval)
    return load.stop()


def wait_quiet(max_wait_s, threshold=0.2):
    """Waits (up to max_wait_s) until other processes use < threshold cores; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    busy = others_busy()
    while busy >= threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = others_busy()
    return busy


# ----------------------------------------------------------------------------- memory
def _proc_status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _can_reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_mem_cpu(runner, phase, warm=True):
    """Peak extra resident bytes of one call (see the module docstring; the caller warms up)."""
    runner.reset_grads()
    gc.collect()
    if warm:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status()["VmRSS"]
        out = getattr(runner, phase)()
        peak = _proc_status()["VmHWM"]
    else:  # no HWM reset possible: fresh process, compare ru_maxrss
        import resource

        before = _proc_status()["VmRSS"]
        out = getattr(runner, phase)()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del out
    return max(0, peak - before)


def measure_mem_cuda(runner, phase):
    runner.reset_grads()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = getattr(runner, phase)()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak - before


def mem_worker(spec_json):
    """Subprocess entry (CPU): measures the given (impl, variant) list for one shape, prints JSON."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    shape, dtype, device = spec["shape"], getattr(torch, spec["dtype"]), "cpu"
    warm = spec["warm"]
    if warm and not _can_reset_hwm():
        print(json.dumps({"error": "clear_refs not writable"}))
        return
    results = []
    for name, variant in spec["items"]:
        rec = {"impl": name, "variant": variant}
        try:
            module, call, params = make_impl(name, shape, variant, device, dtype)
            runner = Runner(name, module, call, params, make_inputs(shape, variant, device, dtype))
            if warm:  # one untimed fwd+bwd: oneDNN primitives, thread pools, lazy init
                runner.reset_grads()
                runner.fwdbwd()
            for phase in spec["phases"]:
                rec[f"peak_mem_{phase}_bytes"] = measure_mem_cpu(runner, phase, warm)
        except Exception as err:
            rec["error"] = f"{type(err).__name__}: {err}"
        results.append(rec)
        del rec
        gc.collect()
    print("MEMJSON " + json.dumps(results))


def _mem_subprocess(spec):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", KERAS_BACKEND="torch")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--mem-worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMJSON "):
            return json.loads(line[len("MEMJSON "):])
        if line.startswith("{") and "error" in line:
            return json.loads(line)
    raise RuntimeError(f"memory worker failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


def cpu_memory(shape, items, dtype, threads):
    """{(impl, variant): {...}} for one shape; method string."""
    spec = dict(shape=shape, items=items, dtype=str(dtype).replace("torch.", ""), threads=threads, warm=True,
                phases=["fwd", "fwdbwd"])
    res = _mem_subprocess(spec)
    method = "rss_hwm_reset (fresh subprocess per shape, warm-up, MALLOC_MMAP_THRESHOLD_=65536)"
    if isinstance(res, dict):  # clear_refs unavailable: one cold process per (item, phase)
        method = "ru_maxrss delta (fresh subprocess per measurement, no warm-up)"
        res = []
        for item in items:
            merged = {"impl": item[0], "variant": item[1]}
            for phase in ("fwd", "fwdbwd"):
                for r in _mem_subprocess(dict(spec, items=[item], warm=False, phases=[phase])):
                    merged.update(r)
            res.append(merged)
    return {(r["impl"], r["variant"]): r for r in res}, method


# ----------------------------------------------------------------------------- run
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


def fmt_ms(v):
    return "-" if v is None else (f"{v:8.3f}" if v < 100 else f"{v:8.1f}")


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
    out_path = args.out or os.path.join(HERE, "results", f"attention_{device}_{str(dtype).replace('torch.', '')}.json")
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
            shape = dict(shape)
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
                               variant=variant, impl=r.name, mode=mode, dtype=str(dtype).replace("torch.", "") if mode != "autocast_bf16" else "float32+autocast(bfloat16)",
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
    doc["total_seconds"] = time.perf_counter() - t_start
    doc["targets"] = evaluate_targets(doc["records"], device)
    _write_json(doc, out_path)
    print_targets(doc["targets"])
    print(f"\nwrote {out_path} ({len(doc['records'])} records, {doc['total_seconds']:.0f} s)")
    if not args.no_chart:
        chart(doc, os.path.splitext(out_path)[0] + ".png")
    return doc


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None,
                   help="input/weight dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--shapes", default=None,
                   help="small|large|memory|all or a comma list (default: small,memory on CPU; large,memory on CUDA; "
                        "all = small,memory on CPU, small,large,memory on CUDA)")
    p.add_argument("--variants", default=None, help=f"comma list out of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--impls", default=None, help="comma list of implementations (the baseline is always added)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd modules")
    p.add_argument("--compile-variants", default="self", help="variants to compile (default: self)")
    p.add_argument("--no-autocast", action="store_true", help="CUDA: skip the autocast(bf16) rows")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-RSS subprocesses")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--heaviness", choices=list(ITERS), default=None, help="override the iteration counts")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each group, wait up to SECONDS until other processes use < 0.2 CPU cores")
    p.add_argument("--retries", type=int, default=0,
                   help="CPU: re-time a group up to N more times when other processes used > 0.2 cores; keep the quietest")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/attention_<device>_<dtype>.json)")
    p.add_argument("--mem-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--check-targets", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: evaluate the --device targets from these result files; exit 0 met, 3 missed")
    args = p.parse_args(argv)
    if args.mem_worker is not None:
        mem_worker(args.mem_worker)
        return
    if args.check_targets:
        sys.exit(check_targets(args.check_targets, args.device, expected=3 if args.device == "cuda" else 8))
    run(args)


if __name__ == "__main__":
    main()

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
  ``dist_mha.attention.kernels.flash.AVAILABLE`` False) gets a null record with the reason.
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

# The code lives in bench/attention_bench/ (one concern per module, see its __init__);
# this script is the command line, and re-exports what other scripts import from it
# (bench_tp.py: _proc_status, machine_info, OthersLoad, others_busy, wait_quiet).

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if HERE not in sys.path:  # the attention_bench package (already sys.path[0] when run as a script)
    sys.path.append(HERE)
os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras

from attention_bench.config import (  # noqa: E402,F401
    BASELINE,
    CPU_HEAVY,
    DEFAULT_SHAPES,
    ITERS,
    SHAPES,
    VARIANTS,
)
from attention_bench.driver import run  # noqa: E402,F401
from attention_bench.impls import (  # noqa: E402,F401
    FusedBaseline,
    Unsupported,
    _keras,
    attention_flops,
    auto_backend,
    impl_names,
    make_impl,
    make_inputs,
)
from attention_bench.load import (  # noqa: E402,F401
    OthersLoad,
    _cpu_jiffies,
    _proc_jiffies,
    others_busy,
    wait_quiet,
)
from attention_bench.memory import (  # noqa: E402,F401
    _can_reset_hwm,
    _mem_subprocess,
    _proc_status,
    cpu_memory,
    measure_mem_cpu,
    measure_mem_cuda,
    mem_worker,
)
from attention_bench.report import (  # noqa: E402,F401
    _find,
    _write_json,
    chart,
    check_targets,
    evaluate_targets,
    fmt_ms,
    machine_info,
    print_group,
    print_targets,
)
from attention_bench.runners import build_runners, heaviness, math_too_big  # noqa: E402,F401
from attention_bench.timing import Runner, _Null, _sync, attention_ops, time_group  # noqa: E402,F401


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

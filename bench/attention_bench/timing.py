"""Timing: one implementation's fwd / fwd+bwd step (Runner) and the round-robin timing of a group."""

from __future__ import annotations

import resource
import time

import torch


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

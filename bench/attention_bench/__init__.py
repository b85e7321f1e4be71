"""The pieces of bench/bench_attention.py (the script and its docstring are the documentation).

config (shapes, variants, iteration counts), impls (the implementations and their
inputs, FLOP count), timing (Runner, round-robin timing), load (other processes'
CPU use, from /proc), memory (peak memory, the CPU worker subprocess), runners
(building a group's runners), driver (the benchmark loop and its records),
report (printing, targets, chart, machine info).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras

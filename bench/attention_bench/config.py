"""What is benchmarked at which size: shapes, variants, iteration counts."""

from __future__ import annotations

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
        # T/E = 4 (the GPU's T=16k E=4096 in miniature) and T/E = 0.5, where the
        # weights are as large as the activations and any weight copy shows.
        "cpu": [dict(name="memory_T1024", B=1, T=1024, S=512, E=256, N=8, variants=("self", "causal")),
                dict(name="memory_T4096", B=1, T=4096, S=2048, E=256, N=8, variants=("self",)),
                dict(name="memory_T2048_E512", B=1, T=2048, S=1024, E=512, N=4, variants=("self",)),
                dict(name="memory_T512_E1024", B=1, T=512, S=256, E=1024, N=8, variants=("self",))],
        "cuda": [dict(name="memory_T1024", B=1, T=1024, S=512, E=4096, N=32, variants=("self",), iters=(1, 3, 1))]
                + [dict(name=f"memory_T{t}", B=1, T=t, S=t // 2, E=4096, N=32, variants=("self", "causal"),
                        iters=(1, 3, 1)) for t in (4096, 8192, 16384)],
    },
}
DEFAULT_SHAPES = {"cpu": "small,memory", "cuda": "large,memory"}
# Iteration counts (warmup, rounds, iters per round) by how heavy a shape is.
ITERS = {"light": (5, 10, 5), "medium": (2, 5, 2), "heavy": (1, 3, 1)}
CPU_HEAVY = (1, 2, 1)  # CPU memory shapes: these exist for the memory numbers, keep the run short

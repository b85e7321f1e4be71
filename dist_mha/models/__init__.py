"""Models built from the layers: a tensor-parallel transformer block, a small decoder LM, and
Hugging Face causal LMs (`from_hf`, `to_hf`) on the same layers."""


def __getattr__(name):
    # Lazy, so `import dist_mha.models.decoder` does not load the Hugging Face bridge.
    if name in ("from_hf", "to_hf"):
        from dist_mha.models import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'dist_mha.models' has no attribute {name!r}")

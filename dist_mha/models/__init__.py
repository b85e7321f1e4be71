"""Models built from the layers: a tensor-parallel transformer block and a small decoder LM."""

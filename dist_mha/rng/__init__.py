"""Randomness: a counter-based RNG (weights and dropout masks by global index), named streams, generator swaps."""

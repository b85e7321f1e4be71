"""The attention engine under every layer: inputs, projections, masks, kernels, RNG streams."""

"""Tensor parallelism: head/feature sharding, parallel linears, gradient norms and resharding of state dicts."""

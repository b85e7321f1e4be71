"""Single-device attention: Keras mask semantics, packed segments, the KV cache and the local kernels.

Nothing here talks to other processes (no `torch.distributed`): the engine
(`dist_mha.engine`) joins these pieces with the parallel layouts.
"""

"""Rank-pool task bodies for test_llm_layouts.py: the issue-17 features at every parallel layout (float64)."""

from __future__ import annotations

import torch

from dist_mha import GroupQueryAttention
from dist_mha.testing import compare_with_reference

B, T, E = 2, 16, 16
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8}
SEG = torch.tensor([[0] * 5 + [1] * 6 + [2] * 3 + [-1] * 2, [7] * 9 + [8] * 7])


def cases():
    """`{name: (layer kwargs, call kwargs)}`; GQA with 4 query heads of 4 and 2 key/value heads."""
    base = dict(head_dim=4, num_query_heads=4, num_key_value_heads=2)
    causal = dict(use_causal_mask=True)
    return {
        "rope": ({**base, "rope": LLAMA3}, causal),
        "qk_norm": ({**base, "rope": {"rope_type": "default"}, "qk_norm": "rms"}, causal),
        "softcap_scale": ({**base, "rope": YARN, "logit_softcap": 1.5, "scale": 0.4}, causal),
        "sinks_window": ({**base, "rope": {"rope_type": "default"}, "attention_sinks": True, "sliding_window": 5},
                         causal),
        "packed": ({**base, "rope": LLAMA3, "qk_norm": "rms", "attention_sinks": True}, dict(causal, segment_ids=SEG)),
        "position_ids": ({**base, "rope": LLAMA3, "qk_norm": "rms"},
                         dict(causal, position_ids=3 * torch.arange(T)[None].expand(B, T) + torch.tensor([[0], [5]]))),
        "dropout": ({**base, "rope": LLAMA3, "attention_sinks": True, "dropout": 0.3, "seed": 4,
                     "dropout_mode": "tp_invariant"}, dict(causal, training=True)),
    }


def _randomised(kwargs):
    """Norm weights and sinks away from their initial 1 and 0, so their gradients and effect are visible."""
    def patch(layer):
        with torch.no_grad():
            for name in ("query_norm", "key_norm"):
                if name in layer._modules:
                    layer._modules[name].weight.copy_(torch.linspace(0.5, 1.5, layer._key_dim))
            if getattr(layer, "sinks", None) is not None:
                h0 = layer.sinks.shape[0] * layer.tp_rank if layer.sinks.shape[0] < layer._num_heads else 0
                full = torch.linspace(-1.0, 1.0, layer._num_heads, dtype=layer.sinks.dtype)
                layer.sinks.copy_(full[h0:h0 + layer.sinks.shape[0]])
        return layer
    return patch


class _Patched(GroupQueryAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _randomised(kwargs)(self)


def layouts(ctx, tp, cp, mode, sequence_parallel=False, names=None):
    """`{case: max error over output, input grads and weight grads}` at one layout, float64."""
    if cp == 1:
        tp_group, cp_group = ctx.group(tp), None
    else:
        tp_group, cp_group = ctx.grid(tp, cp)
    report = {}
    for name, (layer_kw, call) in cases().items():
        if names is not None and name not in names:
            continue
        try:
            r = compare_with_reference(tp_group, layer_kw, (B, T, E), call_kwargs=call, layer_cls=_Patched,
                                       cp_group=cp_group, cp_mode=mode, sequence_parallel=sequence_parallel,
                                       check=False)
        except Exception as err:
            raise AssertionError(f"case {name!r} at TP={tp} x CP={cp} {mode} sp={sequence_parallel}: {err}") from err
        report[name] = max(r["max_abs_error"].values())
    return report

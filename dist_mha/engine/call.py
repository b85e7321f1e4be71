"""One call of the engine: its state, and the checks that open it.

Shape legend: B batch, T/S query/key positions (global under context
parallelism), E features.

`validate` checks every argument on this rank and starts the cross-rank
agreement check (so a rank's local error reaches its peers before any
collective), then returns the `Call` the stages of the forward
(`stages.py`) fill in, one field group per stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dist_mha.engine import config as cfg
from dist_mha.engine import inputs
from dist_mha.parallel.cp import layout as cp_layout


@dataclass
class Call:
    """Everything one forward call carries from stage to stage."""

    # -- validate: the checked arguments
    query: torch.Tensor
    value: torch.Tensor
    key: torch.Tensor
    mask_args: dict  # query_mask, value_mask, key_mask, attention_mask, segment_ids, position_ids as given
    return_scores: bool
    local_scores: bool
    causal: bool
    dropout_p: float
    cache: object
    pending: object  # the rank-agreement check in flight, or None
    lead: torch.Size = field(default=None)  # the query's leading dims (before TP/SP entry)
    # -- masks
    layout: object = None
    masks: object = None
    T: int = 0  # global query positions (attention dims flattened)
    S: int = 0  # global key positions, cached ones included
    # -- project
    rows: torch.Tensor | None = None  # flat indices of the tokens projected (None: all)
    q: torch.Tensor | None = None  # (B, d.., n, H)
    k: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    v: torch.Tensor | None = None
    # -- attend
    heads: tuple[int, int] = (0, 0)  # this TP rank's query heads [h0, h1)
    out_BTNH: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    # -- output
    output: torch.Tensor | None = None

    def wait_agreement(self) -> None:
        """Finishes the rank-agreement check (before this call's first collective)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.wait()


def validate(layer, query, value, key, mask_args: dict, return_scores, training, causal, cache, local_scores) -> Call:
    """Checks this call's arguments; starts the agreement check under TP/CP (its error raised on every rank)."""
    agree = bool(layer._check_groups) and layer.check_ranks
    try:
        query, value, key = inputs.check_inputs(layer, query, value, key)
        return_scores = cfg.boolean("return_attention_scores", return_scores)
        causal = cfg.boolean("use_causal_mask", causal)
        if training is not None:
            training = cfg.boolean("training", training)
        if cache is not None:
            inputs.check_cache_call(layer, cache, query, value, causal)
        if layer.cp_size > 1:
            cp_layout.check_cp_call(layer, query, value, return_scores, cache)
        local_error = None
    except ValueError as err:
        if not agree:
            raise
        local_error = err  # every rank of the groups must hear of it before any collective
    training = layer.training if training is None else training
    dropout_p = layer._dropout if training else 0.0
    pending = None
    if agree:
        masks = [mask_args[k] for k in inputs.MASK_ARGS]
        pending = inputs.check_tp_call(layer, query, value, key, masks, return_scores, causal, dropout_p > 0,
                                       -1 if cache is None else cache.length, local_error,
                                       wait=torch.compiler.is_compiling())  # compiled: one break, here
    return Call(query, value, key, mask_args, return_scores, bool(local_scores), causal, dropout_p, cache, pending)

"""Incremental decoding for `DecoderLM`: a KV cache per block and greedy generation.

Shape legend: B batch, P prompt length, T tokens so far, V vocabulary.

A prompt is run once (prefill) and every later step feeds only the newest
token: its keys and values join each block's cache and its query attends to
all of them, so a step costs O(T) instead of a full O(T^2) forward. Under
tensor parallelism each rank caches only its own key/value heads; every rank
computes the same (all-reduced) logits and so picks the same next token.
"""

from __future__ import annotations

import torch


class DecoderCache:
    """One `KVCache` per block of a `DecoderLM`.

    Args:
        model: the `DecoderLM`.
        batch_size: rows decoded together.
        max_length: the most positions (prompt + generated) it will hold.
    """

    def __init__(self, model, batch_size: int, max_length: int):
        if max_length > model.max_len:
            raise ValueError(f"Received max_length={max_length} but the model has positions for max_len={model.max_len}.")
        self.layers = [block.attention.init_cache(batch_size, max_length) for block in model.blocks]

    @property
    def length(self) -> int:
        """Positions cached so far."""
        return self.layers[0].length

    @property
    def nbytes(self) -> int:
        """Bytes of every block's key and value buffers on this rank."""
        return sum(c.nbytes for c in self.layers)

    def reset(self) -> None:
        for c in self.layers:
            c.reset()


@torch.no_grad()
def generate(model, prompt_BP: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding: the prompt followed by `max_new_tokens` argmax tokens, `(B, P + max_new_tokens)`.

    Args:
        model: a `DecoderLM` (in eval mode for deterministic output).
        prompt_BP: int64 `(B, P)` prompt tokens, P >= 1.
        max_new_tokens: tokens to generate.

    Example:

    >>> tokens = generate(model.eval(), prompt, max_new_tokens=8)
    """
    if prompt_BP.dim() != 2 or prompt_BP.shape[1] < 1:
        raise ValueError(f"Received prompt of shape {tuple(prompt_BP.shape)}, expected (batch, length >= 1) token ids.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"Received max_new_tokens={max_new_tokens!r}, expected a non-negative int.")
    B, P = prompt_BP.shape
    cache = model.init_cache(B, P + max_new_tokens)
    tokens = [prompt_BP]
    logits = model(prompt_BP, cache=cache)  # prefill
    for _ in range(max_new_tokens):
        nxt = logits[:, -1:].argmax(dim=-1)
        tokens.append(nxt)
        if len(tokens) - 1 == max_new_tokens:
            break
        logits = model(nxt, cache=cache)
    return torch.cat(tokens, dim=1)

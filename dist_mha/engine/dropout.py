"""The dropout randomness of an attention layer: its streams, and which one a call draws from.

A layer keeps a per-rank stream (`attention_dropout`: TP rank, and CP rank
under context parallelism, mixed into the seed), a replicated one (equal on
every TP rank, for randomness on tensors all ranks hold) and a call counter
that keys `dropout_mode="tp_invariant"` masks by (seed, call, global head,
position). Mixed into `AttentionCore`.
"""

from __future__ import annotations

from dist_mha.attention.kernels import AttentionRequest
from dist_mha.rng.invariant import InvariantKeep
from dist_mha.rng.streams import CallCounter, RNGStream, stream_seed


class DropoutStreams:
    def _make_streams(self, base: int) -> None:
        seed = self.seed if self.seed is not None else base
        if self.seed is not None or self.tp_size > 1 or self.cp_size > 1:
            # seed=None on one device keeps Keras's meaning: torch's global RNG.
            # Under TP/CP the per-rank stream needs a seed; `base` follows torch.manual_seed.
            rank = self.tp_rank + self.tp_size * self.cp_rank
            self._dropout_stream = RNGStream(stream_seed(seed, "attention_dropout", rank), "attention_dropout")
        self.replicated_stream = RNGStream(stream_seed(seed, "replicated"), "replicated")
        self._invariant_calls = CallCounter(stream_seed(seed, "invariant_dropout"))

    def rng_streams(self) -> list:
        """The layer's RNG streams (for `dist_mha.rng.streams.checkpoint`)."""
        return [s for s in (self._dropout_stream, self.replicated_stream, self._invariant_calls) if s is not None]

    def _dropout_for(self, req: AttentionRequest, h0: int, h1: int):
        """The stream to fork for dropout, or None when `req.dropout_keep` carries TP-invariant masks."""
        if self.dropout_mode != "tp_invariant":
            return self._dropout_stream
        req.dropout_keep = InvariantKeep(self._invariant_calls, self._num_heads, req.T, req.S, h0, h1, req.dropout_p)
        return None

"""Training data generated from the seed and the step: nothing to download, exact resume.

Batch `step` of DP rank `r` is a pure function of `(seed, step, r)`, so the
data position of a run is its step and a resumed run sees exactly the batches
an uninterrupted run would have seen.

- `AssociativeRecall`: `n` key-value pairs, then queries each followed by its
  value; the answers are scored. Values are uniform and independent of the
  keys, so a model that cannot look back at the context (no attention)
  cannot do better than `ln(num_values)` on an answer.
- `TextBytes`: windows of a local file's bytes (vocabulary 256), next-byte prediction.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dist_mha.rng.counter import mix64


class AssociativeRecall:
    """Multi-query associative recall.

    A sequence is `k1 v1 ... kn vn q1 a1 ... qm am`: n key-value pairs with
    distinct keys, then m queries (distinct keys from the pairs), each followed
    by its value. The model is scored on predicting every answer `a_i` at the
    position of `q_i`.
    """

    def __init__(self, num_keys=16, num_values=16, num_pairs=6, num_queries=None, seed=0):
        num_queries = num_pairs if num_queries is None else num_queries
        if num_pairs > num_keys:
            raise ValueError(f"Received num_pairs={num_pairs} > num_keys={num_keys}; keys in a sequence are distinct.")
        if not 0 < num_queries <= num_pairs:
            raise ValueError(f"Received num_queries={num_queries}, expected 1..num_pairs={num_pairs}.")
        self.num_keys, self.num_values, self.seed = num_keys, num_values, seed
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.vocab_size = num_keys + num_values
        self.seq_len = 2 * (num_pairs + num_queries)

    @property
    def chance_loss(self) -> float:
        """The best answer loss without looking at the context."""
        return math.log(self.num_values)

    loss_label = "train loss on the answer tokens"

    @property
    def floor_label(self) -> str:
        return f"best without attention: ln {self.num_values} = {self.chance_loss:.2f}"

    def batch(self, step: int, dp_rank: int, batch_size: int):
        """Returns `(tokens (B, L), targets (B, L), loss_mask (B, L))`; only answers are scored."""
        g = torch.Generator().manual_seed(mix64(self.seed, step, dp_rank) & ((1 << 63) - 1))
        B, n, m = batch_size, self.num_pairs, self.num_queries
        rows = torch.arange(B)[:, None]
        keys = torch.argsort(torch.rand(B, self.num_keys, generator=g), dim=1)[:, :n]
        values = torch.randint(0, self.num_values, (B, n), generator=g) + self.num_keys
        pick = torch.argsort(torch.rand(B, n, generator=g), dim=1)[:, :m]
        tokens = torch.empty(B, self.seq_len, dtype=torch.long)
        tokens[:, 0:2 * n:2] = keys
        tokens[:, 1:2 * n:2] = values
        tokens[:, 2 * n::2] = keys[rows, pick]
        tokens[:, 2 * n + 1::2] = values[rows, pick]
        targets = torch.zeros_like(tokens)
        targets[:, 2 * n::2] = values[rows, pick]
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[:, 2 * n::2] = True
        return tokens, targets, mask


class TextBytes:
    def __init__(self, path, seq_len=64, seed=0):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Received data.path={str(path)!r}, which is not a file; pass a local text file.")
        self.data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
        if len(self.data) < seq_len + 2:
            raise ValueError(f"data.path holds {len(self.data)} bytes, fewer than seq_len+2={seq_len + 2}.")
        self.seq_len, self.seed, self.vocab_size = seq_len, seed, 256
        self.chance_loss = math.log(256)
        self.loss_label = "train loss per byte (next-byte prediction)"
        self.floor_label = "uniform guess over 256 byte values: ln 256 = 5.55"

    def batch(self, step: int, dp_rank: int, batch_size: int):
        g = torch.Generator().manual_seed(mix64(self.seed, step, dp_rank) & ((1 << 63) - 1))
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        window = self.data[idx]
        tokens, targets = window[:, :-1], window[:, 1:]
        return tokens, targets, torch.ones_like(tokens, dtype=torch.bool)


def make_data(cfg, seed: int):
    """The data source of a `data` config (`packing` set: variable-length documents, see packing.py)."""
    from dist_mha.train.packing import RecallDocuments, TextDocuments

    packing = cfg.get("packing")
    if packing not in (None, True, False):
        raise ValueError(f"Received data.packing={packing!r}, expected null, true or false.")
    if cfg.name == "recall":
        if packing is not None:
            return RecallDocuments(cfg.num_keys, cfg.num_values, cfg.min_pairs, cfg.max_pairs, int(cfg.docs_per_step),
                                   cfg.packed_len, packing, seed)
        return AssociativeRecall(cfg.num_keys, cfg.num_values, cfg.num_pairs, cfg.get("num_queries"), seed)
    if cfg.name == "text":
        if packing is not None:
            return TextDocuments(cfg.path, cfg.seq_len, int(cfg.docs_per_step), packing, seed)
        return TextBytes(cfg.path, cfg.seq_len, seed)
    raise ValueError(f"Received data.name={cfg.name!r}, expected 'recall' or 'text'.")

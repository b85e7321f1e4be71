"""Variable-length documents, batched padded or packed (`data.packing`).

Shape legend: R rows in a batch, L row length.

Step `s` of DP rank `r` draws the same documents either way (a pure
function of `(seed, s, r)`); only their arrangement differs:
- padded (`packing=false`): one document per row, right-padded to the
  longest document of the step;
- packed (`packing=true`): documents laid end to end into rows of
  `seq_len` (first fit, in draw order), the rest of a row padded.
Every position carries its document's id (`segment_ids`; -1 for padding),
so attention stays inside a document and positions restart per document
(`DecoderLM(..., segment_ids=)`); the loss ignores padding. Both
arrangements therefore compute the same per-token losses on the same
documents: the tests check that training curves agree.

Sources:
- `RecallDocuments`: associative-recall episodes with a random number of
  pairs each (`min_pairs..max_pairs`, queries = pairs); answers are scored.
- `TextDocuments`: a local file split into documents at blank lines (each
  cut to `seq_len` bytes); next-byte prediction.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dist_mha.rng.counter import mix64


def _arrange(docs, packing: bool, seq_len: int, multiple: int):
    """`(tokens, targets, loss_mask, segment_ids)` from `[(tokens, targets, mask)]` documents."""
    if packing:
        rows, fill = [], []
        for i, d in enumerate(docs):
            n = len(d[0])
            for r, used in enumerate(fill):
                if used + n <= seq_len:
                    rows[r].append(i)
                    fill[r] += n
                    break
            else:
                rows.append([i])
                fill.append(n)
        L = seq_len
    else:
        rows = [[i] for i in range(len(docs))]
        longest = max(len(d[0]) for d in docs)
        L = -(-longest // multiple) * multiple  # padded rows must still split for context parallelism
    R = len(rows)
    tokens = torch.zeros(R, L, dtype=torch.long)
    targets = torch.zeros(R, L, dtype=torch.long)
    mask = torch.zeros(R, L, dtype=torch.bool)
    ids = torch.full((R, L), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for i in members:
            tok, tgt, m = docs[i]
            n = len(tok)
            tokens[r, pos:pos + n], targets[r, pos:pos + n], mask[r, pos:pos + n] = tok, tgt, m
            ids[r, pos:pos + n] = i
            pos += n
    return tokens, targets, mask, ids


class RecallDocuments:
    """Associative-recall episodes of random length: `k1 v1 ... kn vn q1 a1 ... qn an`, n in [min, max].

    Args:
        num_keys, num_values: vocabulary of keys and values.
        min_pairs, max_pairs: range of pairs per document.
        docs_per_step: documents per step and DP rank.
        seq_len: packed row length (at least the longest document, 4 * max_pairs).
        packing: pack documents into rows (True) or one per padded row (False).
        seed: data seed.
    """

    def __init__(self, num_keys=16, num_values=16, min_pairs=2, max_pairs=6, docs_per_step=32, seq_len=48,
                 packing=False, seed=0):
        if not 1 <= min_pairs <= max_pairs <= num_keys:
            raise ValueError(f"Received min_pairs={min_pairs}, max_pairs={max_pairs}, num_keys={num_keys}; expected "
                             "1 <= min_pairs <= max_pairs <= num_keys.")
        if seq_len < 4 * max_pairs:
            raise ValueError(f"Received seq_len={seq_len}: the longest document has 4 * max_pairs = {4 * max_pairs} "
                             "tokens; raise seq_len or lower max_pairs.")
        self.num_keys, self.num_values = num_keys, num_values
        self.min_pairs, self.max_pairs, self.docs_per_step = min_pairs, max_pairs, docs_per_step
        self.seq_len, self.packing, self.seed = seq_len, packing, seed
        self.vocab_size = num_keys + num_values
        self.chance_loss = math.log(num_values)
        self.loss_label = "train loss on the answer tokens"
        self.floor_label = f"best without attention: ln {num_values} = {self.chance_loss:.2f}"
        self.multiple = 2

    def documents(self, step: int, dp_rank: int):
        g = torch.Generator().manual_seed(mix64(self.seed, step, dp_rank, 7) & ((1 << 63) - 1))
        docs = []
        for _ in range(self.docs_per_step):
            n = int(torch.randint(self.min_pairs, self.max_pairs + 1, (1,), generator=g))
            keys = torch.randperm(self.num_keys, generator=g)[:n]
            values = torch.randint(0, self.num_values, (n,), generator=g) + self.num_keys
            order = torch.randperm(n, generator=g)
            tok = torch.empty(4 * n, dtype=torch.long)
            tok[0:2 * n:2], tok[1:2 * n:2] = keys, values
            tok[2 * n::2], tok[2 * n + 1::2] = keys[order], values[order]
            tgt = torch.zeros_like(tok)
            tgt[2 * n::2] = values[order]
            m = torch.zeros(4 * n, dtype=torch.bool)
            m[2 * n::2] = True
            docs.append((tok, tgt, m))
        return docs

    def batch(self, step: int, dp_rank: int, batch_size: int = 0):
        """`(tokens, targets, loss_mask, segment_ids)`, each `(R, L)`; `batch_size` is unused (docs_per_step)."""
        return _arrange(self.documents(step, dp_rank), self.packing, self.seq_len, self.multiple)


class TextDocuments:
    """A local text file split into documents at blank lines; next-byte prediction within each document."""

    def __init__(self, path, seq_len=128, docs_per_step=16, packing=False, seed=0):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Received data.path={str(path)!r}, which is not a file; pass a local text file.")
        raw = path.read_bytes()
        docs = [d for d in raw.split(b"\n\n") if len(d) >= 2]
        if not docs:
            raise ValueError(f"data.path={str(path)!r} holds no document of 2 or more bytes (documents are separated "
                             "by blank lines).")
        self.docs = [torch.tensor(list(d[: seq_len + 1]), dtype=torch.long) for d in docs]
        self.seq_len, self.docs_per_step, self.packing, self.seed = seq_len, docs_per_step, packing, seed
        self.vocab_size, self.chance_loss = 256, math.log(256)
        self.loss_label = "train loss per byte (next-byte prediction)"
        self.floor_label = "uniform guess over 256 byte values: ln 256 = 5.55"
        self.multiple = 2

    def documents(self, step: int, dp_rank: int):
        g = torch.Generator().manual_seed(mix64(self.seed, step, dp_rank, 11) & ((1 << 63) - 1))
        picks = torch.randint(0, len(self.docs), (self.docs_per_step,), generator=g).tolist()
        out = []
        for i in picks:
            d = self.docs[i]
            out.append((d[:-1], d[1:], torch.ones(len(d) - 1, dtype=torch.bool)))
        return out

    def batch(self, step: int, dp_rank: int, batch_size: int = 0):
        return _arrange(self.documents(step, dp_rank), self.packing, self.seq_len, self.multiple)

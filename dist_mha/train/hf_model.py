"""The training app's Hugging Face model: `model=hf model.path=<dir>` fine-tunes a local checkpoint.

Tokens: the data sources make token ids without a tokenizer (associative
recall: ids `0 .. num_keys + num_values - 1`; `data=text`: the file's bytes,
`0 .. 255`), and they are used as the model's token ids directly, so any
checkpoint whose `vocab_size` is at least the data's vocabulary can be
fine-tuned on them (a checkpoint's own tokenizer is not read). The run keeps
the checkpoint's `config.json` as `hf_config.json`, so `launch/export_hf.py`
can write the trained weights back without the source directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from dist_mha.checkpoint.atomic_io import atomic_write
from dist_mha.models.hf import from_hf

CONFIG_NAME = "hf_config.json"


def read_config(path) -> dict:
    """The checkpoint's `config.json`.

    Raises:
        ValueError: when `model.path` is not a checkpoint directory.
    """
    f = Path(str(path)) / "config.json"
    if not f.is_file():
        raise ValueError(f"Received model.path={str(path)!r}, which has no config.json; expected a local Hugging Face "
                         "checkpoint directory (config.json + *.safetensors), e.g. one written by save_pretrained.")
    return json.loads(f.read_text())


def build(cfg, data, state, device, dtype, run_dir: Path, is_main: bool, tp_axis=None, cp_axis=None):
    """`from_hf(model.path)` at the run's layout, after checking the data fits its vocabulary.

    `tp_axis`, `cp_axis`: the TP and CP process groups or mesh axes the app chose (default: the state's groups).

    Raises:
        ValueError: when the data's token ids do not fit the checkpoint's vocabulary
            (naming both and the fix), or anything `from_hf` refuses.
    """
    raw = read_config(cfg.model.path)
    vocab = raw.get("vocab_size")
    if vocab is not None and data.vocab_size > vocab:
        raise ValueError(f"Received data={cfg.data.name} with token ids up to {data.vocab_size - 1}, but the checkpoint "
                         f"{cfg.model.path} has vocab_size={vocab}: every id must be < vocab_size. Pick a data "
                         "source whose vocabulary fits (data=recall with fewer keys/values), or a larger model.")
    cp = int(cfg.parallel.get("cp", 1))
    tp_axis = state.tp_group if tp_axis is None else tp_axis
    cp_axis = (state.cp_group if cp > 1 else None) if cp_axis is None else cp_axis
    model = from_hf(cfg.model.path, tp_group=tp_axis, cp_group=cp_axis,
                    cp_mode=cfg.parallel.get("cp_mode", "ring"),
                    sequence_parallel=bool(cfg.parallel.sequence_parallel), dtype=dtype, device=device)
    if is_main:
        atomic_write(run_dir / CONFIG_NAME, lambda f: f.write((json.dumps(raw, indent=2) + "\n").encode()))
    return model

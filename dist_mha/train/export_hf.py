"""Export a training run of `model=hf` as a Hugging Face checkpoint: `python launch/export_hf.py <run_dir> <out_dir>`.

Takes the run's newest checkpoint step that verifies against its manifest
(the same rule as `launch/generate.py`), reshards it to one rank (it may have
been written at any TP degree), and writes `config.json` + `model.safetensors`
with `to_hf`; `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`
loads the result. One process, no GPU needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dist_mha.models.causal_lm import CausalLM
from dist_mha.models.hf import config as hf_config
from dist_mha.models.hf import to_hf
from dist_mha.train import checkpointing
from dist_mha.train.generate import newest_intact_step
from dist_mha.train.hf_model import CONFIG_NAME

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def load_trained(run_dir) -> tuple[CausalLM, Path]:
    """`(model at TP=1 holding the newest intact step's weights, that step's directory)`.

    Raises:
        ValueError: when `run_dir` is not a run of `model=hf`.
        FileNotFoundError: when it holds no intact checkpoint.
    """
    run_dir = Path(run_dir)
    cfg_file = run_dir / CONFIG_NAME
    if not cfg_file.is_file():
        raise ValueError(f"{run_dir} has no {CONFIG_NAME}: export_hf exports runs of model=hf (train with "
                         "model=hf model.path=<checkpoint dir>).")
    raw = json.loads(cfg_file.read_text())
    step = newest_intact_step(run_dir)
    manifest = json.loads((step / "manifest.json").read_text())
    state = checkpointing.load_model_state(step, None)  # resharded to one rank
    dtype = next(v.dtype for k, v in state.items() if k.endswith(".weight"))
    model = CausalLM(hf_config.parse(raw), dtype=dtype)
    model.load_state_dict(state)
    model.hf_config = raw
    model.trained_step = manifest.get("step")
    return model.eval(), step


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a training run directory of model=hf (outputs/<id>)")
    parser.add_argument("out_dir", type=Path, help="where to write config.json and model.safetensors")
    args = parser.parse_args(argv)
    model, step = load_trained(args.run_dir)
    to_hf(model, args.out_dir)
    print(json.dumps({"exported": str(args.out_dir), "from": str(step), "step": model.trained_step}), file=sys.stdout)
    return args.out_dir

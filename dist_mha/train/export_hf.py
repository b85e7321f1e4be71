"""Export a training run of `model=hf` as a Hugging Face checkpoint: `python launch/export_hf.py <run_dir> <out_dir>`.

Takes the run's newest checkpoint step that verifies against its manifest
(torchrun runs' TP shard sets, DCP steps of `parallel.dp_mode=fsdp2` or
`train.checkpoint_format=dcp`, or DeepSpeed's model states for ZeRO stages
0-2), reshards it to one rank (it may have been written at any DP, TP and CP
layout), and writes `config.json` + `model.safetensors` with `to_hf`;
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads the
result. One process, no GPU needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from dist_mha.models.causal_lm import CausalLM
from dist_mha.models.hf import config as hf_config
from dist_mha.models.hf import to_hf
from dist_mha.parallel.tp.reshard import reshard_state_dicts
from dist_mha.train import checkpointing
from dist_mha.train import run_dir as run_dirs
from dist_mha.train.hf_model import CONFIG_NAME


def newest_intact_step(run_dir: Path) -> tuple[Path, str]:
    """`(step directory, "tp" | "dcp" | "deepspeed")` of the newest step that verifies, over every kind.

    Raises:
        FileNotFoundError: when no step verifies (each one's problems listed).
    """
    found, problems = [], []
    for kind, root in run_dirs.ROOTS.items():
        for step, step_dir in run_dirs.steps(run_dir / root):
            bad = run_dirs.verify_step(step_dir)
            if not bad:
                found.append((step, kind, step_dir))
                break
            problems.append(f"{step_dir}: {' '.join(bad)}")
    if not found:
        listing = "".join(f"\n  {p}" for p in problems)
        raise FileNotFoundError(f"No intact checkpoint in {run_dir}{listing or ' (no steps)'}; train first, or pass "
                                "the run dir of a run that saved one.")
    _, kind, step_dir = max(found)
    return step_dir, kind


def _deepspeed_state(step_dir: Path) -> dict:
    """The model's state at TP=1 from DeepSpeed's per-TP-rank model states (ZeRO 0-2 keep whole TP shards)."""
    files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    stage = int(states[0].get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage >= 3:
        raise ValueError(f"{step_dir} was written by ZeRO stage 3, which partitions the weights themselves; "
                         "export_hf reads stages 0-2. Train with launcher.zero_stage<=2 (or launcher=torchrun).")
    return reshard_state_dicts([s["module"] for s in states], 1, 0)


def _dcp_model(step_dir: Path, cfg) -> CausalLM:
    """A one-process `CausalLM` holding a DCP step's weights (DCP reads each tensor by its global shape).

    The step was verified against its manifest already, so DCP's own
    `SHA256SUMS` pass is skipped (it would hash every file again).
    """
    import torch.distributed.checkpoint as torch_dcp

    from dist_mha.checkpoint import dcp

    meta = torch_dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    model = CausalLM(cfg, dtype=meta["model.embed.weight"].properties.dtype, initialize=False)
    with warnings.catch_warnings():  # DCP warns that it runs in one process: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(step_dir, model, verify_files=False)
    return model


def load_trained(run_dir) -> tuple[CausalLM, Path]:
    """`(model at TP=1 holding the newest intact step's weights, that step's directory)`.

    Raises:
        ValueError: when `run_dir` is not a run of `model=hf`, or its step is ZeRO-3.
        FileNotFoundError: when it holds no intact checkpoint.
    """
    run_dir = Path(run_dir)
    cfg_file = run_dir / CONFIG_NAME
    if not cfg_file.is_file():
        raise ValueError(f"{run_dir} has no {CONFIG_NAME}: export_hf exports runs of model=hf (train with "
                         "model=hf model.path=<checkpoint dir>).")
    raw = json.loads(cfg_file.read_text())
    step, kind = newest_intact_step(run_dir)
    manifest = run_dirs.read_manifest(step)
    cfg = hf_config.parse(raw)
    if kind == "dcp":
        model = _dcp_model(step, cfg)
    else:
        state = checkpointing.load_model_state(step, None) if kind == "tp" else _deepspeed_state(step)
        dtype = next(v.dtype for k, v in state.items() if k.endswith(".weight"))
        model = CausalLM(cfg, dtype=dtype, initialize=False)
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

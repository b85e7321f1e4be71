"""The Hydra entry point: `python launch/train.py [overrides]` or `dist-mha-train [overrides]`.

The run directory must be the same on every rank: it is pinned to the
launcher's run id (torchrun's `TORCHELASTIC_RUN_ID`, SLURM's job id) before
falling back to a timestamp, and the training loop makes every rank use rank
0's (launchers without a shared id, such as the `deepspeed` CLI, can give the
ranks different timestamps). Hydra itself writes nothing there
(`hydra.output_subdir: null`): rank 0 writes `.hydra/` once the run holds
the directory's lock, so a run that is refused leaves another run's record
untouched. The `deepspeed` launcher appends `--local_rank=N`, which Hydra
would reject; it is dropped here (ranks come from the environment).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf


def _rank0_only(value):
    return value if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0" else None


def _run_id(default):
    from dist_mha.train.distributed import launch_id

    return launch_id() or default


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dist_mha_rank0"):
        OmegaConf.register_new_resolver("dist_mha_rank0", _rank0_only)
    if not OmegaConf.has_resolver("dist_mha_run_id"):
        OmegaConf.register_new_resolver("dist_mha_run_id", _run_id)


def strip_local_rank(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(a)
    return out


def config_dir() -> str:
    """`configs/` of the repository (editable install or checkout), or $DIST_MHA_CONFIG_DIR."""
    env = os.environ.get("DIST_MHA_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "configs", Path.cwd() / "configs"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return str(c)
    raise FileNotFoundError(
        f"No configs/config.yaml found in {[str(c) for c in candidates]}; set DIST_MHA_CONFIG_DIR to the repository's configs/."
    )


def write_hydra_record(run_dir, cfg) -> None:
    """What Hydra would write to `<run_dir>/.hydra/`: the config, Hydra's own config and the overrides."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out = Path(run_dir) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), out / "hydra.yaml")
    OmegaConf.save(hc.overrides.task, out / "overrides.yaml")


def run(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from dist_mha.train.loop import train

    train(cfg, HydraConfig.get().runtime.output_dir, on_start=lambda run_dir: write_hydra_record(run_dir, cfg))


def main() -> None:
    """Console script `dist-mha-train`."""
    import hydra

    register_resolvers()
    sys.argv = strip_local_rank(sys.argv)
    hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(run)()

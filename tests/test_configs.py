"""Every YAML in configs/ composes, overrides keep their documented names, sweeps run."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("hydra", reason="needs hydra-core (the launch extra)")
from hydra import compose, initialize_config_dir  # noqa: E402

from dist_mha.train.app import register_resolvers, strip_local_rank  # noqa: E402
from train_helpers import FAST, ROOT, env, metrics  # noqa: E402

CONFIGS = ROOT / "configs"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONFIGS.iterdir() if g.is_dir() and g.name != "hydra"}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_option_composes(group, option):
    register_resolvers()
    overrides = [f"{group}={option}"] + (["data.path=/dev/null"] if (group, option) == ("data", "text") else [])
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert cfg[group] is not None
    for key in ("model", "parallel", "data", "optim", "train", "launcher"):
        assert key in cfg


def test_documented_overrides_exist():
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["parallel.tp=2", "train.steps=7", "hydra.run.dir=/tmp/x"], return_hydra_config=True)
    assert cfg.parallel.tp == 2 and cfg.train.steps == 7 and cfg.hydra.run.dir == "/tmp/x"


def test_run_dir_uses_the_launcher_run_id(monkeypatch):
    register_resolvers()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.run.dir == "outputs/abc123"


def test_deepspeed_local_rank_argument_is_accepted():
    assert strip_local_rank(["train.py", "--local_rank=1", "parallel.tp=2", "--local-rank", "3"]) == ["train.py", "parallel.tp=2"]


def test_multirun_sweep_runs_each_job(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--multirun", f"hydra.sweep.dir={tmp_path}",
                           *FAST, "train.steps=5,10"], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "0")] == [5]
    assert [r["step"] for r in metrics(tmp_path / "1")] == [5, 10]


def test_text_data_trains_on_a_local_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *FAST,
                           "data=text", f"data.path={text}", "data.seq_len=32"], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"]

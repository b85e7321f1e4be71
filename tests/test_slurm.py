"""The slurm/ scripts: syntax always; real `sbatch --wait` jobs on a local one-node cluster.

`.ci/slurm_up.sh` starts that cluster (CI runs it); elsewhere the job tests
are skipped with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from train_helpers import ROOT, env, metrics, sbatch

SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))
TINY = ["model=tiny", "train.steps=10", "train.ckpt_every=5", "train.log_every=5", "train.progress=false"]


def _cluster_up() -> bool:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed"))


needs_slurm = pytest.mark.skipif(not _cluster_up(), reason="needs a running SLURM cluster (bash .ci/slurm_up.sh), found none")


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_sbatch_script_parses(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH" in text and "set -euo pipefail" in text


@needs_slurm
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_sbatch_two_process_cpu_job_trains(tmp_path, script):
    run_dir = tmp_path / "run"
    e = env()
    e.update(RUN_DIR=str(run_dir), NPROC_PER_NODE="2", PYTHON=sys.executable)
    proc = sbatch("--nodes=1", f"--output={tmp_path}/job.out", str(script), *TINY, env=e)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert proc.returncode == 0, proc.stderr + log[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world"] == 2 and summary["tp"] == 2
    assert [r["step"] for r in metrics(run_dir)] == [5, 10]


@needs_slurm
def test_hydra_submitit_sweep_runs_two_task_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs hydra-submitit-launcher")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--multirun", "hydra/launcher=slurm",
                           f"hydra.sweep.dir={tmp_path}", "parallel.tp=2", "train.steps=5,10", *TINY[:1], *TINY[2:]],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in metrics(tmp_path / "0")] == [5]
    assert [r["step"] for r in metrics(tmp_path / "1")] == [5, 10]


@needs_slurm
def test_sbatch_single_node_with_context_parallelism(tmp_path):
    run_dir = tmp_path / "run"
    e = env()
    e.update(RUN_DIR=str(run_dir), NPROC_PER_NODE="2", TP="1", CP="2", CP_MODE="ring", PYTHON=sys.executable)
    script = ROOT / "slurm" / "single_node.sbatch"
    proc = sbatch("--nodes=1", f"--output={tmp_path}/job.out", str(script), *TINY, env=e)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert proc.returncode == 0, proc.stderr + log[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world"], summary["tp"], summary["cp"]) == (2, 1, 2)

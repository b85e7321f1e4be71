"""The training app on Hugging Face checkpoints: `model=hf model.path=<dir>`, then `launch/export_hf.py`.

A tiny Llama checkpoint is built locally (tests/hf_models.py), fine-tuned as
users would run it (real torchrun / DeepSpeed / SLURM subprocesses), exported,
and loaded with transformers, whose logits must equal the trained model's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (the dev extra)")
pytest.importorskip("hydra", reason="needs hydra-core (the launch extra)")

import hf_models  # noqa: E402
from train_helpers import ROOT, TRAIN, env, metrics, run, sbatch, torchrun_bin  # noqa: E402

EXPORT = str(ROOT / "launch" / "export_hf.py")
FAST = ["train.steps=20", "train.ckpt_every=10", "train.log_every=5", "train.progress=false", "train.plot=false",
        "train.batch_size=16"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny float32 Llama checkpoint (llama3 rope, biases, 4 query / 2 key-value heads, vocabulary 128)."""
    return hf_models.save(hf_models.build("llama", dtype=torch.float32), tmp_path_factory.mktemp("src"))


def _torchrun(run_dir, nproc, *overrides, timeout=300):
    return run([torchrun_bin(), "--standalone", f"--nproc-per-node={nproc}", TRAIN, f"hydra.run.dir={run_dir}",
                *FAST, *overrides], timeout)


def test_finetune_tp2_under_torchrun_export_and_transformers_gives_the_trained_logits(tmp_path, source):
    run_dir = tmp_path / "run"
    _torchrun(run_dir, 2, "model=hf", f"model.path={source}", "parallel.tp=2")
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10, 15, 20] and rows[-1]["loss"] < rows[0]["loss"]
    assert _exported_logits_equal_trained(run_dir, tmp_path / "exported", source)["step"] == 20


def test_finetune_with_context_parallelism(tmp_path, source):
    run_dir = tmp_path / "cp"
    _torchrun(run_dir, 2, "model=hf", f"model.path={source}", "parallel.cp=2", "parallel.cp_mode=ulysses",
              "train.steps=5", "train.ckpt_every=5")
    assert [r["step"] for r in metrics(run_dir)] == [5]


def test_finetune_fsdp2_with_dcp_checkpoints_and_export_the_dcp_step(tmp_path, source):
    # DTensor parameters on the TP mesh axis, fully_shard per block and root, DCP steps; export reads DCP.
    run_dir = tmp_path / "fsdp2"
    _torchrun(run_dir, 2, "model=hf", f"model.path={source}", "parallel.tp=2", "parallel.dp_mode=fsdp2",
              "train.steps=5", "train.ckpt_every=5")
    assert [r["step"] for r in metrics(run_dir)] == [5]
    assert "PyTorch FSDP2, DCP checkpoints" in (run_dir / "train.log").read_text()
    assert not (run_dir / "checkpoints").exists()
    report = _exported_logits_equal_trained(run_dir, tmp_path / "exported", source)
    assert report["step"] == 5 and "dcp_checkpoints" in report["from"]


def _exported_logits_equal_trained(run_dir, out, source):
    """Exports `run_dir` with the script; transformers' logits of the export equal the trained model's."""
    from transformers import AutoModelForCausalLM

    from dist_mha.models import from_hf
    from dist_mha.train.export_hf import load_trained

    proc = run([sys.executable, EXPORT, str(run_dir), str(out)])
    trained, _ = load_trained(run_dir)  # the newest verified step, resharded to one rank
    theirs = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = theirs(ids).logits
        assert (trained(ids) - logits).abs().max() < 1e-4
        # It was fine-tuned: the exported logits are not the source checkpoint's.
        assert (from_hf(source)(ids) - logits).abs().max() > 1e-3
    return json.loads(proc.stdout.splitlines()[-1])


def test_finetune_under_deepspeed_and_export_its_checkpoint(tmp_path, source):
    pytest.importorskip("deepspeed", reason="needs deepspeed (the deepspeed extra)")
    run_dir = tmp_path / "ds"
    _torchrun(run_dir, 2, "model=hf", f"model.path={source}", "parallel.tp=2", "launcher=deepspeed",
              "launcher.zero_stage=1", "train.steps=5", "train.ckpt_every=5", timeout=400)
    assert [r["step"] for r in metrics(run_dir)] == [5]
    report = _exported_logits_equal_trained(run_dir, tmp_path / "exported", source)
    assert report["step"] == 5 and "deepspeed_checkpoints" in report["from"]


def test_data_whose_ids_exceed_the_vocabulary_is_refused(tmp_path, source):
    from omegaconf import OmegaConf

    from dist_mha.train import hf_model
    from dist_mha.train.data import TextBytes

    text = tmp_path / "corpus.txt"
    text.write_text("bytes need 256 ids " * 20)
    cfg = OmegaConf.create({"model": {"name": "hf", "path": source}, "data": {"name": "text"}})
    with pytest.raises(ValueError) as e:  # checked before anything is loaded
        hf_model.build(cfg, TextBytes(text, seq_len=16), None, "cpu", torch.float32, tmp_path, True)
    assert "token ids up to 255" in str(e.value) and "vocab_size=128" in str(e.value)


def test_export_of_a_run_that_is_not_model_hf_is_refused(tmp_path):
    from dist_mha.train.export_hf import main

    with pytest.raises(ValueError, match="export_hf exports runs of model=hf"):
        main([str(tmp_path), str(tmp_path / "out")])


def _slurm_up() -> bool:
    import shutil

    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed"))


@pytest.mark.skipif(not _slurm_up(), reason="needs a running SLURM cluster (bash .ci/slurm_up.sh), found none")
def test_finetune_under_slurm(tmp_path, source):
    run_dir = tmp_path / "run"
    e = env()
    e.update(RUN_DIR=str(run_dir), NPROC_PER_NODE="2", PYTHON=sys.executable)
    proc = sbatch("--nodes=1", f"--output={tmp_path}/job.out", str(ROOT / "slurm" / "single_node.sbatch"),
                  "model=hf", f"model.path={source}", *FAST, "train.steps=10", env=e)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert proc.returncode == 0, proc.stderr + log[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["tp"] == 2
    assert [r["step"] for r in metrics(run_dir)] == [5, 10]

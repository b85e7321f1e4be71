"""Grouped-query attention in the training app, and generation from its checkpoints.

Real subprocesses, as a user would run them (see train_helpers.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from train_helpers import ROOT, metrics, run, torchrun, train

GENERATE = str(ROOT / "launch" / "generate.py")
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
F64 = "train.dtype=float64"


def test_torchrun_tp2_with_one_kv_head_matches_the_tp1_loss_curve(tmp_path):
    # The tiny model has 4 query heads; one key/value head is replicated on both
    # ranks, whose weight gradients are summed (and counted once when clipping).
    train(tmp_path / "tp1", F64, "model.num_kv_heads=1")
    torchrun(tmp_path / "tp2", 2, "parallel.tp=2", F64, "model.num_kv_heads=1")
    tp1, tp2 = metrics(tmp_path / "tp1"), metrics(tmp_path / "tp2")
    assert [r["step"] for r in tp2] == [5, 10, 15, 20]
    for a, b in zip(tp1, tp2):
        assert abs(a["loss"] - b["loss"]) < 1e-9, (a, b)
    # ... and a run with as many key/value heads as query heads trains differently.
    train(tmp_path / "mha", F64)
    assert metrics(tmp_path / "mha")[-1]["loss"] != tp1[-1]["loss"]


def test_greedy_generation_from_a_trained_checkpoint_beats_chance_at_tp1_and_tp2(tmp_path):
    run_dir = tmp_path / "run"
    run([sys.executable, str(ROOT / "launch" / "train.py"), f"hydra.run.dir={run_dir}", "model.num_kv_heads=1",
         "train.steps=600", "train.progress=false", "train.plot=false"], timeout=600)
    single = json.loads(run([sys.executable, GENERATE, str(run_dir), "--batches", "2"]).stdout.strip().splitlines()[-1])
    assert single["tp"] == 1 and single["num_kv_heads"] == 1
    # 16 equally likely values: chance is 1/16. The model answers from context.
    assert single["teacher_forced_accuracy"] > 4 * single["chance"], single
    assert single["accuracy"] > 2 * single["chance"], single
    # The checkpoint (written at TP=1) reshards to TP=2; the two ranks decode the same answers.
    proc = run([TORCHRUN, "--standalone", "--nproc-per-node=2", GENERATE, str(run_dir), "--batches", "2"])
    double = json.loads(proc.stdout.strip().splitlines()[-1])
    assert double["tp"] == 2
    assert abs(double["accuracy"] - single["accuracy"]) <= 2 / double["answers"]  # float32 argmax ties at most
    assert double["kv_cache_bytes_per_rank"] == single["kv_cache_bytes_per_rank"]  # one head, replicated
    assert json.loads((run_dir / "generation.json").read_text())["tp"] == 2

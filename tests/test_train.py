"""End to end: the Hydra app alone, under torchrun (TP, TP x DP, SP), resume, faults, DeepSpeed.

Every run is a real subprocess, as a user would start it. Each run is small
(tiny model, 20 steps) so the whole file stays around two minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train_helpers import final_weights, metrics, torchrun, train


def test_single_process_run_writes_metrics_plot_checkpoints_and_logs(tmp_path):
    proc = train(tmp_path, "train.plot=true", "train.progress=true")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all({"step", "loss", "tokens_per_s"} <= set(r) for r in rows)
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000020"
    assert "step 20/20" in proc.stderr  # the progress bar
    log = (tmp_path / "train.log").read_text()
    assert "done:" in log and "launched by single process | PyTorch | 1 threads" in log
    assert not (tmp_path / "run.lock").exists()  # released at exit


def test_loss_curve_labels_name_what_the_data_source_measures(tmp_path):
    from dist_mha.train.data import AssociativeRecall, TextBytes
    from dist_mha.train.plot import plot_loss

    pytest.importorskip("matplotlib", reason="needs matplotlib (the launch extra)")
    text = tmp_path / "corpus.txt"
    text.write_text("abc " * 100)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "loss": 3.0}\n{"step": 10, "loss": 2.0}\n')
    recall = plot_loss(tmp_path / "metrics.jsonl", tmp_path / "recall.png", AssociativeRecall())
    assert recall == ["train loss on the answer tokens", "best without attention: ln 16 = 2.77"]
    labels = plot_loss(tmp_path / "metrics.jsonl", tmp_path / "text.png", TextBytes(text, seq_len=8))
    assert labels == ["train loss per byte (next-byte prediction)", "uniform guess over 256 byte values: ln 256 = 5.55"]
    assert (tmp_path / "text.png").stat().st_size > 1000


def test_a_run_that_fails_before_it_starts_leaves_no_run_dir(tmp_path):
    from train_helpers import failed

    run_dir = tmp_path / "run"
    out = failed(train(run_dir, "data=text", f"data.path={tmp_path / 'missing.txt'}", check=False))
    assert "which is not a file" in out
    assert not run_dir.exists()  # not an empty outputs/<id>/ with only .hydra/ and an empty log


def test_default_config_learns_recall_far_below_the_no_attention_floor(tmp_path):
    import sys

    from train_helpers import TRAIN, run

    run([sys.executable, TRAIN, f"hydra.run.dir={tmp_path}", "train.progress=false", "train.plot=false"], timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # Without attention the answer is a uniform guess among 16 values: ln 16 = 2.77 nats.
    assert summary["final_loss"] < 0.5 * summary["chance_loss"], summary


def test_resume_reproduces_an_uninterrupted_run_bitwise(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    drop = ["model.dropout=0.2", "model.attention_dropout=0.2"]  # exercise the RNG streams too
    train(straight, *drop)
    train(resumed, *drop, "train.stop_at_step=10")
    assert [r["step"] for r in metrics(resumed)] == [5, 10]
    train(resumed, *drop)
    assert metrics(resumed) == [dict(r, tokens_per_s=m["tokens_per_s"]) for r, m in zip(metrics(straight), metrics(resumed))]
    a, b = final_weights(straight, 20), final_weights(resumed, 20)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


F64 = "train.dtype=float64"  # TP changes summation order only: in float64 curves agree to ~1e-12


def test_torchrun_tp2_matches_single_process_loss_curve(tmp_path):
    train(tmp_path / "tp1", F64)
    proc = torchrun(tmp_path / "tp2", 2, "parallel.tp=2", F64)
    tp1, tp2 = metrics(tmp_path / "tp1"), metrics(tmp_path / "tp2")
    assert [r["step"] for r in tp2] == [5, 10, 15, 20]
    for a, b in zip(tp1, tp2):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
    # Only rank 0 logs: each progress line once, one .hydra directory, one log file.
    assert proc.stdout.count("done:") == 1
    assert "launched by torchrun, 2 processes" in proc.stdout
    assert len(list(Path(tmp_path / "tp2").glob("**/.hydra"))) == 1


def test_torchrun_tp2_dp2_with_sequence_parallel(tmp_path):
    torchrun(tmp_path / "sp", 4, "parallel.tp=2", "parallel.sequence_parallel=true", F64)
    torchrun(tmp_path / "nosp", 4, "parallel.tp=2", F64)
    sp, nosp = metrics(tmp_path / "sp"), metrics(tmp_path / "nosp")
    assert json.loads((tmp_path / "sp" / "summary.json").read_text())["dp"] == 2
    for a, b in zip(sp, nosp):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)


def test_resume_at_a_different_tp_degree(tmp_path):
    straight = tmp_path / "straight"
    train(straight, F64)
    run_dir = tmp_path / "switch"
    torchrun(run_dir, 2, "parallel.tp=2", "train.stop_at_step=10", F64)
    train(run_dir, F64)  # resumes the TP=2 checkpoint at TP=1 (model and Adam state resharded)
    assert [r["step"] for r in metrics(run_dir)] == [5, 10, 15, 20]
    for a, b in zip(metrics(straight), metrics(run_dir)):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)


def test_killed_rank_restarts_and_resumes_without_lost_or_repeated_steps(tmp_path):
    straight = tmp_path / "straight"
    torchrun(straight, 2, "parallel.tp=2")
    faulty = tmp_path / "faulty"
    proc = torchrun(faulty, 2, "parallel.tp=2", "train.fail_at_step=13", extra=["--max-restarts=1"])
    assert "fault injection" in proc.stdout + proc.stderr
    steps = [r["step"] for r in metrics(faulty)]
    assert steps == [5, 10, 15, 20]  # 15 was not logged before the crash; 5 and 10 are not repeated
    for a, b in zip(metrics(straight), metrics(faulty)):
        assert a["loss"] == b["loss"]
    a, b = final_weights(straight, 20), final_weights(faulty, 20)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", [0, 1, 3])  # stage 2 runs under the deepspeed CLI in test_faults.py
def test_deepspeed_zero_over_the_dp_group_with_our_tp(tmp_path, stage):
    pytest.importorskip("deepspeed", reason="needs deepspeed (the deepspeed extra)")
    torchrun(tmp_path, 4, "parallel.tp=2", "launcher=deepspeed", f"launcher.zero_stage={stage}", timeout=400)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "deepspeed_checkpoints" / "latest").is_file()

"""Context parallelism and packed documents in the training app (real subprocesses).

Float64 runs: a layout changes summation order only, so loss curves agree to ~1e-12.
"""

from __future__ import annotations

import json

from train_helpers import metrics, torchrun, train

F64 = ["train.dtype=float64", "model.dropout=0.0", "model.attention_dropout=0.0"]


def _losses(run_dir):
    return [r["loss"] for r in metrics(run_dir)]


def test_torchrun_tp2_x_cp2_matches_the_tp1_loss_curve(tmp_path):
    train(tmp_path / "tp1", *F64)
    torchrun(tmp_path / "tp2cp2", 4, "parallel.tp=2", "parallel.cp=2", "parallel.cp_mode=ring", *F64)
    summary = json.loads((tmp_path / "tp2cp2" / "summary.json").read_text())
    assert (summary["tp"], summary["cp"], summary["dp"]) == (2, 2, 1)
    for a, b in zip(_losses(tmp_path / "tp1"), _losses(tmp_path / "tp2cp2")):
        assert abs(a - b) < 1e-9, (a, b)
    assert len(_losses(tmp_path / "tp2cp2")) == 4


def test_ulysses_cp2_x_dp2_on_packed_documents_matches_dp2(tmp_path):
    # Packed documents give the two DP ranks different numbers of scored tokens; the loss
    # is the mean over every scored token of the step, whatever the CP degree.
    torchrun(tmp_path / "dp2", 2, *F64, "data.packing=true", "parallel.dp=2")
    torchrun(tmp_path / "cp2dp2", 4, "parallel.cp=2", "parallel.cp_mode=ulysses", *F64, "data.packing=true",
             "parallel.dp=2")
    dp2, cp = _losses(tmp_path / "dp2"), _losses(tmp_path / "cp2dp2")
    assert len(cp) == 4
    for a, b in zip(dp2, cp):
        assert abs(a - b) < 1e-9, (a, b)


def test_packed_and_padded_documents_give_the_same_losses(tmp_path):
    train(tmp_path / "padded", *F64, "data.packing=false")
    train(tmp_path / "packed", *F64, "data.packing=true")
    padded, packed = metrics(tmp_path / "padded"), metrics(tmp_path / "packed")
    assert [r["step"] for r in packed] == [5, 10, 15, 20]
    for a, b in zip(padded, packed):
        assert abs(a["loss"] - b["loss"]) < 1e-10, (a, b)  # the same documents, arranged differently
        assert a["tokens_per_s"] > 0 and b["tokens_per_s"] > 0  # non-padding tokens per second, both ways


def test_a_cp2_checkpoint_resumes_at_cp1(tmp_path):
    straight, switch = tmp_path / "straight", tmp_path / "switch"
    train(straight, *F64)
    torchrun(switch, 2, "parallel.cp=2", *F64, "train.stop_at_step=10")
    assert [r["step"] for r in metrics(switch)] == [5, 10]
    train(switch, *F64)  # the model is replicated over CP: any CP degree resumes it
    assert [r["step"] for r in metrics(switch)] == [5, 10, 15, 20]
    for a, b in zip(_losses(straight), _losses(switch)):
        assert abs(a - b) < 1e-9, (a, b)

"""The training app with `parallel.dp_mode=fsdp2` and DCP checkpoints (real subprocesses), and DCP integrity.

Float64 runs: a layout changes summation order only, so loss curves agree to ~1e-12.
The layer- and model-level checks at DP2 x TP2 and DP2 x CP2 are in tests/test_mesh.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from train_helpers import failed, metrics, torchrun, train

F64 = ["train.dtype=float64"]
FSDP2 = "parallel.dp_mode=fsdp2"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-process reference, and an FSDP2 TP=2 run stopped at step 10, resumed at CP=2 with DDP on the mesh."""
    base = tmp_path_factory.mktemp("fsdp2")
    train(base / "reference", *F64)
    torchrun(base / "run", 2, "parallel.tp=2", FSDP2, "train.stop_at_step=10", *F64)
    torchrun(base / "run", 2, "parallel.cp=2", "train.checkpoint_format=dcp", *F64)
    return base


def _losses(run_dir):
    return [r["loss"] for r in metrics(run_dir)]


def test_fsdp2_run_writes_verified_dcp_steps_and_resumes_at_another_layout(runs):
    run = runs / "run"
    assert [r["step"] for r in metrics(run)] == [5, 10, 15, 20]  # each step once
    for a, b in zip(_losses(runs / "reference"), _losses(run)):
        assert abs(a - b) < 1e-9, (a, b)
    step = run / "dcp_checkpoints" / "step_00000010"
    names = sorted(p.name for p in step.iterdir())
    assert names == [".metadata", "SHA256SUMS", "__0_0.distcp", "__1_0.distcp", "manifest.json"]
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["kind"] == "dcp" and manifest["dp_mode"] == "fsdp2" and manifest["tp"] == 2
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert not (run / "checkpoints").exists()
    log = (run / "train.log").read_text()
    assert "PyTorch FSDP2, DCP checkpoints" in log and "PyTorch, DCP checkpoints" in log  # fsdp2, then ddp
    assert "(saved at dp=1 tp=2 cp=1, now dp=1 tp=1 cp=2)" in log


def test_a_corrupt_dcp_step_is_set_aside_and_the_run_falls_back_to_the_previous_one(runs, tmp_path):
    run = shutil.copytree(runs / "run", tmp_path / "run")
    shard = run / "dcp_checkpoints" / "step_00000020" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    (run / "dcp_checkpoints" / "latest").unlink()  # only a hint
    proc = train(run, FSDP2, *F64)  # one process: loads the 2-rank step 10
    out = proc.stdout
    assert f"{shard} is corrupt" in out and "falling back to step_00000010" in out
    assert (run / "dcp_checkpoints" / "step_00000020.corrupt" / "__1_0.distcp").is_file()  # kept, never read again
    assert [r["step"] for r in metrics(run)] == [5, 10, 15, 20]
    for a, b in zip(_losses(runs / "reference"), _losses(run)):
        assert abs(a - b) < 1e-9, (a, b)


def test_bad_dp_mode_and_checkpoint_format_combinations_are_refused(runs, tmp_path):
    out = failed(train(tmp_path / "a", FSDP2, "train.checkpoint_format=shards", check=False))
    assert "use train.checkpoint_format=dcp" in out
    run = shutil.copytree(runs / "run", tmp_path / "b")  # DCP steps: a shards run cannot resume them
    out = failed(train(run, "train.checkpoint_format=shards", check=False))
    assert "holds checkpoints in dcp_checkpoints/" in out and "train.checkpoint_format=dcp" in out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: DCP says so
def test_dcp_load_checks_every_file_against_its_checksum_first(tmp_path):
    from dist_mha.checkpoint import CheckpointError
    from dist_mha.checkpoint import dcp as dist_dcp
    from dist_mha.models.decoder import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(16, 8, 16, 2, 1, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    opt.step()
    directory = dist_dcp.save(tmp_path / "ckpt", model, opt, meta={"step": 3})
    fresh = DecoderLM(16, 8, 16, 2, 1, 2)
    assert dist_dcp.load(directory, fresh, torch.optim.AdamW(fresh.parameters())) == {"step": 3}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
               if isinstance(a, torch.Tensor))
    (directory / "__9_0.distcp").write_bytes(b"stray")
    with pytest.raises(CheckpointError, match=r"__9_0\.distcp is not listed in SHA256SUMS"):
        dist_dcp.load(directory, fresh)
    (directory / "__9_0.distcp").unlink()
    data = bytearray((directory / ".metadata").read_bytes())
    data[10] ^= 0xFF
    (directory / ".metadata").write_bytes(bytes(data))  # DCP unpickles it: it must never be read when changed
    with pytest.raises(CheckpointError, match=r"\.metadata is corrupt"):
        dist_dcp.load(directory, fresh)

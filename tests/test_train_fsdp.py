"""The training app with `parallel.dp_mode=fsdp2` and DCP checkpoints (real subprocesses), and DCP integrity.

Float64 runs: a layout changes summation order only, so loss curves agree to ~1e-12.
The layer- and model-level checks at DP2 x TP2 and DP2 x CP2 are in tests/test_mesh.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from train_helpers import metrics, torchrun, train

F64 = ["train.dtype=float64"]
FSDP2 = "parallel.dp_mode=fsdp2"


def _losses(run_dir):
    return [r["loss"] for r in metrics(run_dir)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An FSDP2 run at TP=2 (two processes), checkpoints at steps 10 and 20."""
    run_dir = tmp_path_factory.mktemp("fsdp2") / "run"
    torchrun(run_dir, 2, "parallel.tp=2", FSDP2, *F64)
    return run_dir


def test_fsdp2_run_writes_verified_dcp_steps(run):
    assert [r["step"] for r in metrics(run)] == [5, 10, 15, 20]
    step = run / "dcp_checkpoints" / "step_00000010"
    names = sorted(p.name for p in step.iterdir())
    assert names == [".metadata", "SHA256SUMS", "__0_0.distcp", "__1_0.distcp", "manifest.json"]
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["kind"] == "dcp" and manifest["dp_mode"] == "fsdp2" and manifest["tp"] == 2
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert not (run / "checkpoints").exists()
    assert "PyTorch FSDP2, DCP checkpoints" in (run / "train.log").read_text()


def test_a_corrupt_dcp_step_is_set_aside_and_the_run_resumes_the_previous_one_at_another_layout(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    shard = copy / "dcp_checkpoints" / "step_00000020" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    (copy / "dcp_checkpoints" / "latest").unlink()  # only a hint
    proc = train(copy, FSDP2, *F64)  # one process (TP=1) resumes the TP=2 step 10
    assert f"{shard} is corrupt" in proc.stdout and "falling back to step_00000010" in proc.stdout
    assert "(saved at dp=1 tp=2 cp=1, now dp=1 tp=1 cp=1)" in proc.stdout
    assert (copy / "dcp_checkpoints" / "step_00000020.corrupt" / "__1_0.distcp").is_file()  # kept, never read again
    assert [r["step"] for r in metrics(copy)] == [5, 10, 15, 20]  # each step once
    for a, b in zip(_losses(run), _losses(copy)):  # steps 11-20 again, at TP=1: the same losses
        assert abs(a - b) < 1e-9, (a, b)


def test_bad_dp_mode_and_checkpoint_format_combinations_are_refused(tmp_path):
    from omegaconf import OmegaConf

    from dist_mha.train.fsdp import checkpoint_kind
    from dist_mha.train.startup import plan_start

    def kind(**over):
        cfg = {"parallel": {"dp_mode": "ddp"}, "train": {"checkpoint_format": None}, "launcher": {"name": "torchrun"}}
        for key, value in over.items():
            section, name = key.split("__")
            cfg[section][name] = value
        return checkpoint_kind(OmegaConf.create(cfg))

    assert (kind(), kind(parallel__dp_mode="fsdp2"), kind(train__checkpoint_format="dcp")) == ("tp", "dcp", "dcp")
    with pytest.raises(ValueError, match="use train.checkpoint_format=dcp"):
        kind(parallel__dp_mode="fsdp2", train__checkpoint_format="shards")
    with pytest.raises(ValueError, match="expected one of"):
        kind(parallel__dp_mode="zero3")
    with pytest.raises(ValueError, match="Drop launcher=deepspeed"):
        kind(parallel__dp_mode="fsdp2", launcher__name="deepspeed")
    (tmp_path / "dcp_checkpoints" / "step_00000010").mkdir(parents=True)  # a DCP run: shards cannot resume it
    with pytest.raises(ValueError, match="holds checkpoints in dcp_checkpoints/.*train.checkpoint_format=dcp"):
        plan_start(tmp_path, resume=True, kind="tp", run_config={}, tp=1, world=1)


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

"""`from_hf` models on DeviceMesh axes: DTensor parameters, FSDP2, DCP and `to_hf`, on the 4-rank pool.

Tiny float64 checkpoints (tests/hf_models.py, no download). A mesh model must
compute exactly what the process-group model computes (logits < 1e-10; they
run the same local code), hold the checkpoint's weights bit for bit as
DTensors, step like one device under FSDP2, and export the same file. Task
bodies: tests/hf_mesh_tasks.py.
"""

from __future__ import annotations

import pytest
import torch

import hf_mesh_tasks

pytest.importorskip("transformers", reason="needs transformers (the dev extra)")

import hf_models  # noqa: E402

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
STEP_IDS = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(6))  # 4 rows: 2 per DP rank
# (tp, cp, cp_mode, sequence_parallel) per family: TP=4 replicates the 2 key/value heads (and Mistral's 130
# words, which 4 does not divide, are a replicated table); Gemma2 has a tied head and sandwich norms.
LAYOUTS = {"llama": [(2, 1, "ring", True), (2, 2, "ring", False), (4, 1, "ring", False)],
           "gemma2": [(2, 1, "ring", True)],
           "qwen3": [(2, 1, "ring", False)],
           "mistral": [(4, 1, "ring", False)]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`{family: (dir, transformers' logits of IDS)}`, float64."""
    out = {}
    for family in LAYOUTS:
        model = hf_models.build(family, dtype=torch.float64)
        path = hf_models.save(model, tmp_path_factory.mktemp(f"mesh_{family}"))
        with torch.no_grad():
            out[family] = (path, model(IDS).logits)
    return out


def test_from_hf_on_mesh_axes_equals_process_groups_and_transformers(rank_pool, checkpoints):
    cases = [(f, checkpoints[f][0], layouts) for f, layouts in LAYOUTS.items()]
    for per_rank in rank_pool.run(hf_mesh_tasks.logits_parity, cases, IDS, timeout=600):
        assert len(per_rank) == sum(len(v) for v in LAYOUTS.values())
        for (family, layout), r in per_rank.items():
            assert r["vs_groups"] < 1e-10, (family, layout, r["vs_groups"])
            assert r["weights_vs_one_device"] == 0.0, (family, layout)  # the checkpoint's weights, bit for bit
            assert r["placements"], (family, layout)
            assert r.get("same_tokens", True), (family, layout)  # greedy KV-cache decoding, where it runs
            assert (r["logits"] - checkpoints[family][1]).abs().max() < 1e-6, (family, layout)  # as test_hf_models


def test_gated_mlp_rms_norm_and_vocab_tables_alone_on_a_mesh_axis_equal_one_device(rank_pool):
    for errors in rank_pool.run(hf_mesh_tasks.parts_on_mesh):
        assert set(errors) == {"mlp", "norm", "embed", "head"}
        assert max(errors.values()) < 1e-12, errors


def test_fsdp2_step_of_a_from_hf_model_equals_one_device(rank_pool, checkpoints):
    # fully_shard per block and on the root (the app's train.fsdp.shard); AdamW with clipping active.
    cases = [("llama_dp2_tp2", checkpoints["llama"][0], 2, 1, False),
             ("gemma2_dp2_tp2_sp", checkpoints["gemma2"][0], 2, 1, True),  # tied head, norms' partial grads
             ("qwen3_dp2_cp2", checkpoints["qwen3"][0], 1, 2, False)]
    for per_rank in rank_pool.run(hf_mesh_tasks.fsdp_steps, cases, STEP_IDS, timeout=600):
        for name, r in per_rank.items():
            assert r["param"] < 1e-10, (name, r)
            assert r["norm"] < 1e-10, (name, r)  # clip_grad_norm_: the true global norm on every rank
            assert r["norm_value"] > 0.05, (name, r)  # so clipping was active
            assert len(r["meshes"]) == 1 and "dp" in r["meshes"][0], (name, r)  # FSDP sharded every parameter


def test_dcp_reshards_and_to_hf_exports_mesh_models(rank_pool, checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    path = checkpoints["llama"][0]
    outs = {k: str(tmp_path / k) for k in ("groups", "mesh", "trained")}
    reports = rank_pool.run(hf_mesh_tasks.dcp_and_export, path, STEP_IDS, str(tmp_path / "dcp"), outs, timeout=600)
    for r in reports:
        # DP2 x TP2 into TP4: key/value heads replicated, vocabulary split 4 ways (DCP reshards across DP, TP
        # and CP as tests/test_mesh.py checks for DecoderLM; the parameter names here are CausalLM's).
        assert r["tp4cp1"] == {"param": 0.0, "optim": 0.0, "meta": {"step": 1}}, r["tp4cp1"]
    # The mesh model writes the same file as the process-group model.
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "mesh" / name).read_bytes() == (tmp_path / "groups" / name).read_bytes(), name
    trained = AutoModelForCausalLM.from_pretrained(outs["trained"], attn_implementation="eager").eval()
    with torch.no_grad():
        logits = trained(STEP_IDS).logits
    assert (logits - reports[0]["trained_logits"]).abs().max() < 1e-6  # float64: transformers' float32 parts
    source = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (logits - source(STEP_IDS).logits).abs().max() > 1e-4  # the step changed it


def test_bad_mesh_arguments_to_from_hf_raise_before_any_collective(rank_pool, checkpoints):
    for msgs in rank_pool.run(hf_mesh_tasks.mesh_errors, checkpoints["llama"][0]):
        assert "one a DeviceMesh, the other a process group" in msgs["mixed"]
        assert "expected a 1-D DeviceMesh" in msgs["two_dims"] and "state.mesh['tp']" in msgs["two_dims"]
        assert "outside a forward" in msgs["logits_outside_forward"] and "head(x)" in msgs["logits_outside_forward"]

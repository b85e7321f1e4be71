"""DeviceMesh axes: DTensor parameters, FSDP2, DCP, clipping and activation checkpointing, on 4 gloo ranks.

The layouts are DP x CP x TP on the shared 4-rank pool (`rank_pool`), each
checked against one device in float64. See tests/mesh_tasks.py for the task
bodies; cases loop inside one pool run each to keep the suite fast.
"""

from __future__ import annotations

import mesh_tasks


def test_bad_mesh_arguments_raise_a_clear_error_before_any_collective(rank_pool):
    for msgs in rank_pool.run(mesh_tasks.mesh_errors):
        assert "expected a 1-D DeviceMesh" in msgs["two_dims"] and "state.mesh['tp']" in msgs["two_dims"]
        assert "with 2 dims ('dp', 'tp')" in msgs["two_dims"]
        assert "one a DeviceMesh, the other a process group" in msgs["mixed"]
        assert "Valid TP sizes for num_heads=3: [1, 3]" in msgs["heads"]
        assert "expected a 1-D DeviceMesh" in msgs["block_two_dims"]
        assert "Pass query_shape=" in msgs["lazy"]


def test_layers_on_mesh_axes_match_one_device(rank_pool):
    # Every TP case of the process-group suite, GQA with split and replicated key/value heads, and TP x CP.
    for report in rank_pool.run(mesh_tasks.layer_parity):
        assert set(report) == {"tp2", "tp4", "tp2cp2", "tp1cp2"}
        # Every case of the process-group suite, GQA with 1, 2, 4 heads, and RoPE + QK-norm + sinks.
        assert len(report["tp2"]) == 21 and "rope_qk_norm_sinks" in report["tp1cp2"]
        for layout, errors in report.items():
            assert len(errors) >= 7, layout
            assert max(errors.values()) < 1e-12, (layout, errors)


# (model, tp, cp, key/value heads, sequence parallel, mode) on 4 ranks: DP = 4 / (tp * cp).
FSDP_CASES = [("block", 2, 1, 1, False, "fsdp2"), ("lm", 2, 1, 2, True, "fsdp2"), ("block", 1, 2, None, False, "fsdp2"),
              ("lm", 1, 2, 1, False, "fsdp2"), ("lm", 2, 1, 1, False, "ddp")]


def test_fsdp2_step_equals_one_device_at_dp2_tp2_and_dp2_cp2(rank_pool):
    # fully_shard(mesh=state.mesh["dp"]) per block, then on the root; AdamW with clipping active.
    # The last case is the training app's DDP on the mesh (no FSDP), the same step.
    for reports in rank_pool.run(mesh_tasks.fsdp_steps, FSDP_CASES):
        for case, r in zip(FSDP_CASES, reports):
            assert r["param"] < 1e-10, (case, r)
            assert r["norm"] < 1e-12, (case, r)  # clip_grad_norm_: the true global norm on every rank
            assert r["norm_value"] > 0.05, (case, r)  # so clipping was active
            assert len(r["meshes"]) == 1, (case, r)  # one mesh for every parameter: what clip_grad_norm_ needs
            assert ("dp" in r["meshes"][0]) == (case[-1] == "fsdp2"), (case, r)  # FSDP sharded every parameter


def test_dcp_restores_every_rank_and_reshards_across_dp_tp_cp(rank_pool, tmp_path):
    directory = str(tmp_path / "dcp")
    for report in rank_pool.run(mesh_tasks.dcp_reshard, directory, timeout=600):
        assert report.pop("full_state_dict")["param"] == 0.0  # full weights (e.g. imported) load into the shards
        assert set(report) == {f"tp{tp}cp{cp}" for tp, cp in mesh_tasks.LOAD_LAYOUTS}
        for layout, r in report.items():
            assert r["param"] == 0.0 and r["optim"] == 0.0, (layout, r)  # bitwise
            assert r["meta"] == {"step": 1}, (layout, r)
            assert r["step2"] < 1e-10, (layout, r)  # and training continues as on one device


def test_activation_checkpointing_with_dropout_gives_the_same_gradients_at_every_layout(rank_pool):
    for report in rank_pool.run(mesh_tasks.ac_dropout_layouts):
        for layout, r in report.items():
            assert r["ac_vs_plain"] == 0.0, (layout, r)
            assert r["dropout_effect"] > 1e-3, (layout, r)  # dropout was on
            assert r["attention_calls"][1] == 2 * r["attention_calls"][0], (layout, r)  # recomputed


def test_per_rank_checkpoints_of_mesh_layers_reshard_as_before(rank_pool, tmp_path):
    for errors in rank_pool.run(mesh_tasks.per_rank_checkpoint, str(tmp_path)):
        assert max(errors.values()) < 1e-12, errors


def test_keras_penalties_and_constraints_on_mesh_layers_equal_the_process_group_ones(rank_pool):
    for errors in rank_pool.run(mesh_tasks.keras_api_on_mesh):
        assert errors.pop("changed_by_constraint") < -1e-3, errors  # max_norm acted
        assert max(errors.values()) < 1e-12, errors

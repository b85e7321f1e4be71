"""The correctness sweep (issue 16): one test per defect, each failing on the code before its fix.

Single-process defects here; the multi-process ones (ring LSE hand-off, TP x CP
initialisation, broadcast masks under ring, autocast, NCCL-style groups,
`sum_grads`) are in test_sweep_parallel.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_mha import GroupQueryAttention, MultiHeadAttention, TransformerBlock
from dist_mha.attention import blocks
from dist_mha.attention.kernels import AttentionRequest, blockwise, flash, mask_cache, varlen
from dist_mha.attention.masks import MaskSpec
from dist_mha.models.decoder import DecoderLM

B, T, E = 2, 12, 16


class _Ops(TorchDispatchMode):
    """Counts the ATen ops a block of code runs, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _x(dtype=torch.float32, seed=1):
    return torch.randn(B, T, E, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- 2: inference_mode equals no_grad, masks and segment ids made inside it ---------------------

def _module_calls():
    torch.manual_seed(0)
    mha = MultiHeadAttention(4, 4, query_shape=E)
    gqa = GroupQueryAttention(4, 4, 2, query_shape=E, sliding_window=5)
    block = TransformerBlock(E, 4)
    model = DecoderLM(50, 2 * T, E, 4, 1)
    x = _x()

    def keep():
        k = torch.ones(B, T, dtype=torch.bool)
        k[0, 8:] = False
        return k

    def seg():
        return torch.tensor([[0] * 5 + [1] * 7, [3] * 12])

    calls = {}
    for backend in (None, "math", "varlen", "sdpa"):
        for name, layer in (("mha", mha), ("gqa", gqa)):
            calls[f"{name}-{backend}-padding"] = (lambda lyr=layer, b=backend: (
                setattr(lyr, "_attention_backend", b), lyr(x, x, value_mask=keep(), use_causal_mask=True))[1])
            calls[f"{name}-{backend}-segments"] = (lambda lyr=layer, b=backend: (
                setattr(lyr, "_attention_backend", b), lyr(x, x, segment_ids=seg(), use_causal_mask=True))[1])
    calls["block-padding"] = lambda: block(x, padding_mask=keep())
    calls["block-segments"] = lambda: block(x, segment_ids=seg())
    tokens = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(2))
    calls["model-segments"] = lambda: model(tokens, segment_ids=seg())
    return calls


def test_inference_mode_equals_no_grad_for_layers_block_and_model_on_every_backend():
    calls = _module_calls()
    for name, call in calls.items():
        with torch.no_grad():
            expected = call()
        with torch.inference_mode():
            got = call()
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_mask_plans_of_inference_tensors_are_made_per_call_not_cached():
    with torch.inference_mode():
        keep = torch.ones(B, T, dtype=torch.bool)
    made = []
    for _ in range(2):
        mask_cache.cached("test", (keep,), (), lambda: made.append(1))
    assert len(made) == 2
    plain = torch.ones(B, T, dtype=torch.bool)
    for _ in range(2):
        mask_cache.cached("test", (plain,), (), lambda: made.append(1))
    assert len(made) == 3  # one plan for the two calls with the same tensor


# -- 6: differentiable decoding with a value_mask -------------------------------------------------

def test_differentiable_decoding_with_a_value_mask_on_the_math_path_backpropagates_exactly():
    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 4, query_shape=E, attention_backend="math", dtype=torch.float64)
    x = _x(torch.float64).requires_grad_()
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 2] = False
    cache = layer.init_cache(B, T)
    outs = [layer(x[:, :4], x[:, :4], value_mask=keep[:, :4], cache=cache)]
    for t in range(4, T):
        outs.append(layer(x[:, t:t + 1], x[:, t:t + 1], value_mask=keep[:, t:t + 1], cache=cache))
    loss = torch.cat(outs, 1).square().sum()
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    # The same computation without a cache: each chunk's queries attend to every key so far.
    ref = [layer(x[:, :4], x[:, :4], value_mask=keep[:, :4])]
    for t in range(4, T):
        ref.append(layer(x[:, t:t + 1], x[:, :t + 1], value_mask=keep[:, :t + 1]))
    ref_grads = torch.autograd.grad(torch.cat(ref, 1).square().sum(), [x, *layer.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


# -- 8: the ring's CUDA flash blocks ask the same eligibility as flash-attn -------------------------

@pytest.fixture
def cuda_like(monkeypatch):
    """CPU tensors reported as CUDA on a GPU of the given capability (what `choose` reads)."""
    def make(capability):
        monkeypatch.setattr(flash, "_is_cuda", lambda t: True)
        monkeypatch.setattr(flash, "_capability", lambda device: capability)
    return make


def test_ring_blocks_refuse_torch_flash_before_ampere_and_under_flash_attention_false(cuda_like):
    q = torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16)
    cuda_like((7, 5))
    kernels = blockwise.choose(q, q, False, None)
    assert kernels.unmasked != "cuda_flash" and "compute capability 8.0 or newer (this GPU: 7.5)" in kernels.why
    cuda_like((9, 0))
    kernels = blockwise.choose(q, q, False, None)
    # Masked blocks (padding, packing) on the memory-efficient kernel, not on (T/cp)^2 math temporaries.
    assert kernels.unmasked == "cuda_flash" and kernels.masked == "cuda_efficient", kernels
    off = blockwise.choose(q, q, False, None, flash_attention=False)
    assert off.unmasked != "cuda_flash" and "flash_attention=False" in off.why
    assert blockwise.choose(q.float(), q.float(), False, None).unmasked == "cuda_efficient"  # float32: no flash


# -- 10: host reads and CUDA-graph capture ----------------------------------------------------------

def _padded_request(window=None, causal=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, 4, 8, generator=g) for _ in range(3))
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, 9:] = False
    return AttentionRequest(q, k, v, MaskSpec(k_keep_BS=keep, causal=causal, window=window), 8 ** -0.5)


def test_varlen_reads_masks_once_per_plan_and_nothing_per_sequence():
    req = _padded_request(window=3, causal=True)
    varlen.run(req)  # the plan is made here (one host read of the masks)
    again = AttentionRequest(req.q_BTNH, req.k_BSNH, req.v_BSNH, req.masks, req.scale)
    with _Ops() as ops:
        out, _ = varlen.run(again)
    assert "_local_scalar_dense" not in ops.names and "nonzero" not in ops.names, ops.names
    from dist_mha.attention.kernels import math as math_kernel
    torch.testing.assert_close(out, math_kernel.run(again)[0], rtol=1e-5, atol=1e-5)


def test_gathered_key_indices_are_built_once_per_plan():
    req = _padded_request()
    req.masks.k_keep_BS[1, ::3] = False  # not one range: keys are gathered
    seqs, how = varlen.plan(req)
    assert how == "gathered keys" and all(isinstance(s.keys, torch.Tensor) for s in seqs)
    again = AttentionRequest(req.q_BTNH, req.k_BSNH, req.v_BSNH, req.masks, req.scale)
    assert varlen.plan(again)[0] is seqs  # the same plan (and index tensors), not rebuilt


def test_the_varlen_plan_is_not_made_when_an_earlier_backend_serves_the_call(fake_flash, monkeypatch):
    flash_mod = fake_flash("fa2")
    made = []
    real = varlen._plan
    monkeypatch.setattr(varlen, "_plan", lambda req: made.append(1) or real(req))
    req = _padded_request()
    req.q_BTNH, req.k_BSNH, req.v_BSNH = (t.bfloat16() for t in (req.q_BTNH, req.k_BSNH, req.v_BSNH))
    from dist_mha.attention.kernels import dispatch
    module, _ = dispatch.select(req)
    assert module is flash_mod and made == []


def test_flash_unpads_keys_with_one_host_read_per_mask(fake_flash):
    flash_mod = fake_flash("fa2")
    req = _padded_request()
    req.q_BTNH, req.k_BSNH, req.v_BSNH = (t.bfloat16() for t in (req.q_BTNH, req.k_BSNH, req.v_BSNH))
    flash_mod.run(req)
    with _Ops() as ops:
        flash_mod.run(req)
    assert "nonzero" not in ops.names


def test_varlen_and_key_padded_flash_refuse_inside_a_cuda_graph_capture(fake_flash, monkeypatch):
    flash_mod = fake_flash("fa2")
    monkeypatch.setattr(flash, "capturing", lambda: True)
    req = _padded_request()
    assert any("CUDA-graph capture" in r for r in varlen.refusals(req))
    req.q_BTNH, req.k_BSNH, req.v_BSNH = (t.bfloat16() for t in (req.q_BTNH, req.k_BSNH, req.v_BSNH))
    assert any("captured CUDA graph" in r for r in flash_mod.refusals(req))


# -- 12: the smaller ones ---------------------------------------------------------------------------

def test_positional_mask_cache_is_bounded_by_bytes(monkeypatch):
    monkeypatch.setattr(blocks, "_POSITIONAL", {})
    monkeypatch.setattr(blocks, "_POSITIONAL_BYTES", [0])
    monkeypatch.setattr(blocks, "POSITIONAL_CACHE_BYTES", 10_000)
    for t in range(40, 80):
        blocks.positional_mask(t, t, True, None, "cpu")
        assert blocks._POSITIONAL_BYTES[0] <= 10_000
        assert blocks._POSITIONAL_BYTES[0] == sum(m.numel() for m in blocks._POSITIONAL.values())
    blocks.positional_mask(200, 200, True, None, "cpu")  # larger than the budget: made, not kept
    assert (200, 200, True, None, 0, "cpu") not in blocks._POSITIONAL


def test_segment_ids_given_as_a_list_of_rows_are_ids_not_a_pair():
    torch.manual_seed(0)
    layer = MultiHeadAttention(2, 4, query_shape=E)
    x = torch.randn(2, 3, E)
    rows = [[0, 0, 1], [0, 1, 1]]
    torch.testing.assert_close(layer(x, x, segment_ids=rows), layer(x, x, segment_ids=torch.tensor(rows)))
    pair = (torch.tensor(rows), torch.tensor(rows))
    torch.testing.assert_close(layer(x, x, segment_ids=pair), layer(x, x, segment_ids=torch.tensor(rows)))


def test_decoder_takes_a_packed_row_longer_than_max_len_when_each_document_fits():
    torch.manual_seed(0)
    model = DecoderLM(30, 8, 16, 2, 1).eval()
    tokens = torch.randint(0, 30, (1, 16))
    seg = torch.tensor([[0] * 8 + [1] * 8])
    packed = model(tokens, segment_ids=seg)
    torch.testing.assert_close(packed[:, 8:], model(tokens[:, 8:]))  # the second document, as it would be alone
    with pytest.raises(ValueError, match="longest document"):
        model(tokens, segment_ids=torch.tensor([[0] * 7 + [1] * 9]))  # a 9-token document


def test_keras_order_of_checks_for_a_rank_1_key_with_mismatched_features():
    keras = pytest.importorskip("keras")
    q, v, k = np.ones((2, 4, 8), np.float32), np.ones((2, 2, 7), np.float32), np.ones(2, np.float32)
    ours = GroupQueryAttention(2, 4, 4)
    theirs = keras.layers.GroupQueryAttention(head_dim=2, num_query_heads=4, num_key_value_heads=4)
    for layer in (ours, theirs):
        with pytest.raises(ValueError, match="The last dimension of `query_shape` and `value_shape` must be equal"):
            layer.compute_output_shape(q.shape, v.shape, 2)
    ours, theirs = MultiHeadAttention(4, 2), keras.layers.MultiHeadAttention(num_heads=4, key_dim=2)
    for layer in (ours, theirs):
        with pytest.raises(ValueError, match="All dimensions of `value` and `key`, except the last one, must be equal"):
            layer(q, v, k)


def test_relation_live_rows_agree_with_the_mask_they_describe():
    for causal in (False, True):
        for window in (None, 1, 3):
            for q0, q1, k0, k1 in ((0, 6, 0, 6), (4, 9, 0, 3), (0, 3, 5, 9), (2, 8, 3, 4), (7, 8, 0, 8)):
                rel = blocks.relation(q0, q1, k0, k1, causal, window)
                full = blocks.positional_mask(q1 - q0, k1 - k0, causal, window, "cpu", q0 - k0)
                lo, hi = rel.live_rows()
                live = full.any(-1)
                assert live.tolist() == [lo <= i < hi for i in range(q1 - q0)], (causal, window, q0, q1, k0, k1)
                m = rel.mask("cpu")
                assert torch.equal(full, torch.ones_like(full) if m is None else m)
                assert rel.kind != blocks.EMPTY or not full.any()
                assert rel.kind != blocks.FULL or full.all()
                if rel.kind == blocks.CAUSAL:
                    assert torch.equal(full, torch.ones_like(full).tril())


def test_loss_share_reads_nothing_back_to_the_host():
    from dist_mha.train.batches import StepBatch, loss_share

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) < 0.6
    batch = StepBatch(targets, targets, mask, None, float(mask.sum()), 10.0)
    with _Ops() as ops:
        own, share = loss_share(logits, batch, global_mean=False), loss_share(logits, batch, global_mean=True)
    assert "_local_scalar_dense" not in ops.names and "nonzero" not in ops.names, ops.names
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(own, expected)
    torch.testing.assert_close(share, expected)


def test_torchrun_without_a_run_id_is_not_one_job(monkeypatch, tmp_path):
    from dist_mha.train import run_lock
    from dist_mha.train.distributed import launch_id

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's value without --rdzv-id
    assert launch_id() is None and run_lock._identity()["job"] is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launch_id() == "abc"


def test_run_dir_is_not_outputs_none_under_torchrun_without_a_run_id(monkeypatch):
    from hydra import compose, initialize_config_dir

    from dist_mha.train.app import config_dir, register_resolvers

    register_resolvers()
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.run.dir != "outputs/none" and cfg.hydra.run.dir.startswith("outputs/20")


def test_republishing_a_step_always_leaves_a_complete_copy(tmp_path, monkeypatch):
    from pathlib import Path

    from dist_mha.train import run_dir

    final = tmp_path / run_dir.step_name(5)

    def written(text):
        partial = run_dir.partial_dir(tmp_path, 5)
        partial.mkdir()
        (partial / "data").write_text(text)
        return partial

    run_dir.publish(written("first"), final)
    real_rename = Path.rename

    def crash_on_the_new_copy(self, target):
        if self.name.endswith(".partial"):
            raise OSError("the machine went down here")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_the_new_copy)
    with pytest.raises(OSError):
        run_dir.publish(written("second"), final)
    monkeypatch.setattr(Path, "rename", real_rename)
    notes = run_dir.clean(tmp_path)  # what the next start does
    assert (final / "data").read_text() == "first" and any("restored" in n for n in notes)
    run_dir.publish(written("third"), final)
    assert (final / "data").read_text() == "third" and not run_dir.replaced_dir(final).exists()


def test_resumed_cp_ranks_do_not_repeat_the_dropout_masks_of_step_0():
    from dist_mha.rng.streams import collect_streams
    from dist_mha.train.checkpointing import restart_own_streams

    torch.manual_seed(0)
    block = TransformerBlock(E, 4, dropout=0.5, attention_dropout=0.5, seed=3)
    streams = [s for s in collect_streams(block) if s.name in ("attention_dropout", "residual")]
    first = {s.name: torch.rand(4, generator=s.generator("cpu")) for s in streams}
    own = {id(s): s.seed for s in collect_streams(block)}
    for s in streams:
        s.restore({})
    restart_own_streams(block, own, step=100)
    again = {s.name: torch.rand(4, generator=s.generator("cpu")) for s in streams}
    assert all(not torch.equal(first[n], again[n]) for n in first)
    restart_own_streams(block, own, step=100)  # deterministic in the step
    assert all(torch.equal(again[s.name], torch.rand(4, generator=s.generator("cpu"))) for s in streams)

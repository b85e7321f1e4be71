"""The pieces `CausalLM` adds for the Hugging Face families: RMSNorm, GatedMLP, vocabulary-parallel tables.

RMSNorm and the gated MLP are the same float operations as transformers'
modules, so they match bit for bit in float32 and bfloat16 (float64 differs on
purpose: transformers normalises float64 in float32). Under TP (2 and 4, with
and without sequence parallelism) they equal one device in float64.
"""

from __future__ import annotations

import pytest
import torch

import hf_tasks
from dist_mha.models.mlp import GatedMLP
from dist_mha.models.norms import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_rmsnorm_is_transformers_rmsnorm_bit_for_bit(family, dtype):
    pytest.importorskip("transformers", reason="needs transformers (the dev extra)")
    if family == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as Theirs
    else:
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm as Theirs
    theirs = Theirs(48, eps=1e-5).to(dtype)
    ours = RMSNorm(48, 1e-5, unit_offset=family == "gemma2", dtype=dtype)
    assert torch.equal(ours.weight, theirs.weight)  # the same initial weight (1, or 0 for Gemma's 1 + w)
    with torch.no_grad():
        theirs.weight.normal_()
        ours.weight.copy_(theirs.weight)
    x = torch.randn(3, 7, 48).to(dtype)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gated_mlp_is_transformers_mlp_bit_for_bit(family):
    pytest.importorskip("transformers", reason="needs transformers (the dev extra)")
    import hf_models

    theirs = hf_models.build(family, dtype=torch.float32).model.layers[0].mlp
    bias = family == "llama"  # the tiny Llama has mlp_bias=True
    ours = GatedMLP(32, 64, activation="silu" if family == "llama" else "gelu_pytorch_tanh", bias=bias)
    with torch.no_grad():
        for a, b in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            getattr(ours, a).weight.copy_(getattr(theirs, b).weight)
            if bias:
                getattr(ours, a).bias.copy_(getattr(theirs, b).bias)
    x = torch.randn(2, 5, 32)
    assert torch.equal(ours(x), theirs(x))


def test_gated_mlp_refuses_an_unknown_activation():
    with pytest.raises(ValueError, match="activation='gelu_new'"):
        GatedMLP(8, 16, activation="gelu_new")


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_mlp_and_vocab_tables_under_tp_equal_one_device(rank_pool, tp, sp):
    for errors in rank_pool.run(hf_tasks.parts_parity, tp, sp):
        split = {k: v for k, v in errors.items() if k.endswith("_split")}
        assert split["V128_tied_split"] == 1.0 and split["V130_tied_split"] == float(130 % tp == 0)
        assert max(v for k, v in errors.items() if not k.endswith("_split")) < 1e-12, errors

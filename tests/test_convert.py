"""Round trips between torch.nn.MultiheadAttention and dist_mha give identical outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_mha import MultiHeadAttention
from dist_mha.layers.convert import from_torch_mha, to_torch_mha


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_dims", [None, (5, 7)], ids=["same", "kdim_vdim"])
def test_from_torch_mha_gives_same_outputs_and_masks(bias, kv_dims):
    torch.manual_seed(0)
    kdim, vdim = kv_dims or (None, None)
    ref = nn.MultiheadAttention(16, 4, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, dtype=torch.float64).eval()
    ours = from_torch_mha(ref)
    q = torch.randn(2, 6, 16, dtype=torch.float64)
    k = torch.randn(2, 9, kdim or 16, dtype=torch.float64)
    v = torch.randn(2, 9, vdim or 16, dtype=torch.float64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 5:] = True  # torch: True = ignore
    expected, _ = ref(q, k, v, key_padding_mask=pad, need_weights=False)
    got = ours(q, v, k, value_mask=~pad, training=False)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_to_torch_mha_round_trip():
    torch.manual_seed(1)
    ours = MultiHeadAttention(4, 4, query_shape=16, value_shape=7, key_shape=5, dtype=torch.float64)
    theirs = to_torch_mha(ours).eval()
    q = torch.randn(2, 6, 16, dtype=torch.float64)
    k, v = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64)
    causal = torch.ones(6, 3, dtype=torch.bool).triu(1)  # torch: True = not allowed
    expected, _ = theirs(q, k, v, attn_mask=causal, need_weights=False)
    got = ours(q, v, k, use_causal_mask=True, training=False)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    back = from_torch_mha(theirs)
    for a, b in zip(back.get_weights(), ours.get_weights()):
        assert (a == b).all()


def test_to_torch_mha_refuses_what_torch_cannot_express():
    layer = MultiHeadAttention(4, 4, value_dim=3, query_shape=16)
    with pytest.raises(ValueError, match="value_dim=3"):
        to_torch_mha(layer)

"""dist_mha's flash-attn glue against stand-in builds (tests/flash_fakes.py), on CPU.

What is checked: which build is found and how (flash-attn-4 alone, broken
installs), the arguments each signature receives (FA3's seqused/max_seqlen
order, builds without window_size), refusals and their wording, the
dispatch order on sm90, and that the key-padding path neither reads lengths
back from the device nor copies q/k/v. The fakes compute plain float32
attention, so outputs are compared with the math path at bf16 tolerance
(2e-2: the inputs are rounded to bf16).
"""

from __future__ import annotations

import math

import pytest
import torch
from flash_fakes import calls  # the `fake_flash` fixture comes through conftest.py
from torch.utils._python_dispatch import TorchDispatchMode

from dist_mha import MultiHeadAttention
from dist_mha.attention.kernels import AttentionRequest
from dist_mha.attention.kernels import math as math_kernel
from dist_mha.attention.masks import MaskSpec

B, T, S, N, H = 2, 6, 10, 4, 8


def _request(*, K=N, head=H, k_keep=None, dropout_p=0.0, window=None, causal=False, packed=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if packed:  # q/k/v as views of one (B, T, 3, N, H) tensor, as a fused QKV projection leaves them
        qkv = torch.randn(B, S, 3, N, head, generator=gen).to(torch.bfloat16)
        q, k, v = qkv.unbind(2)
    else:
        q = torch.randn(B, T, N, head, generator=gen).to(torch.bfloat16)
        k = torch.randn(B, S, K, head, generator=gen).to(torch.bfloat16)
        v = torch.randn(B, S, K, head, generator=gen).to(torch.bfloat16)
        qkv = None
    masks = MaskSpec(k_keep_BS=k_keep, causal=causal, window=window)
    return AttentionRequest(q, k, v, masks, 1 / math.sqrt(head), dropout_p), qkv


def _reference(req):
    as_f32 = AttentionRequest(req.q_BTNH.float(), req.k_BSNH.float(), req.v_BSNH.float(), req.masks, req.scale)
    return math_kernel.run(as_f32)[0]


def _padding():
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, 7:] = False  # every row keeps fewer than S keys
    keep[1, ::2] = False
    return keep


def test_nothing_installed_says_so_and_nothing_else():
    from dist_mha.attention.kernels import flash

    if flash.VARIANTS or flash._UNUSABLE:
        pytest.skip("a flash-attn build is present on this machine")
    req, _ = _request(dropout_p=0.1)
    reasons = " ".join(flash.refusals(req))
    assert "flash-attn is not installed" in reasons
    # Nothing claims a build that is not there (issue 13: "only FA3 (no dropout) is installed").
    assert "FA3" not in reasons and "is installed" not in reasons


def test_flash_attn_4_alone_runs_as_fa4_not_as_a_broken_fa2(fake_flash):
    flash = fake_flash("fa4_alone")
    assert [v.name for v in flash.VARIANTS] == ["FA4"]
    # `import flash_attn` succeeds (a namespace package) but has no functions: reported, not used.
    assert any("flash_attn is importable but has no flash_attn_func" in r for r in flash._UNUSABLE)
    torch.manual_seed(0)
    fast = MultiHeadAttention(N, H, query_shape=32, flash_attention=True)  # float32 weights, bf16 compute
    ref = MultiHeadAttention(N, H, query_shape=32, attention_backend="math")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(B, T, 32)
    out = fast(x.bfloat16(), x.bfloat16())
    assert fast.last_backend == "flash" and len(calls("flash_attn.cute")) == 1
    torch.testing.assert_close(out.float(), ref(x, x), rtol=2e-2, atol=2e-2)


def test_flash_attn_4_refusals_name_the_real_reasons(fake_flash):
    flash = fake_flash("fa4_alone", capability=(8, 0))
    req, _ = _request(dropout_p=0.1)
    reasons = " ".join(flash.refusals(req))
    assert "FA4 (flash_attn.cute): runs on Hopper and Blackwell" in reasons and "it has no dropout" in reasons
    assert "flash_attn is importable but has no flash_attn_func" in reasons
    assert "flash-attn is not installed" not in reasons


def test_broken_install_is_a_refusal_reason_not_an_import_error(fake_flash):
    flash = fake_flash("fa2_broken")
    req, _ = _request()
    reasons = " ".join(flash.refusals(req))
    assert "flash_attn (FA2) failed to import: OSError: libcudart.so.12" in reasons
    assert "not installed" not in reasons


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "key_padding"])
def test_fa3_of_january_2025_gets_its_arguments_by_keyword(fake_flash, padded):
    # That FA3 takes seqused_q, seqused_k (no default) before max_seqlen_q, max_seqlen_k.
    flash = fake_flash("fa3_2025_01")
    req, _ = _request(k_keep=_padding() if padded else None)
    out, _ = flash.run(req)
    (call,) = calls("flash_attn_interface")
    assert call["fn"] == ("varlen" if padded else "dense")
    torch.testing.assert_close(out.float(), _reference(req), rtol=2e-2, atol=2e-2)


def test_fa3_without_window_size_runs_unwindowed_calls_and_refuses_windows(fake_flash):
    flash = fake_flash("fa3_2024_08")
    req, _ = _request(causal=True, k_keep=None)
    req.k_BSNH, req.v_BSNH = req.k_BSNH[:, :T], req.v_BSNH[:, :T]  # causal needs T == S
    out, _ = flash.run(req)
    torch.testing.assert_close(out.float(), _reference(req), rtol=2e-2, atol=2e-2)
    windowed, _ = _request(window=3)
    windowed.k_BSNH, windowed.v_BSNH = windowed.k_BSNH[:, :T], windowed.v_BSNH[:, :T]
    assert "FA3 (flash_attn_interface): this build takes no window_size" in " ".join(flash.refusals(windowed))


def test_fa3_is_refused_for_head_sizes_not_a_multiple_of_8_and_fa2_takes_over(fake_flash):
    flash = fake_flash("fa3_2025_01", "fa2")
    req, _ = _request(head=12)
    variant, _ = flash.choose(req)
    assert variant.name == "FA2"
    flash.run(req)
    assert len(calls("flash_attn")) == 1 and not calls("flash_attn_interface")
    alone = fake_flash("fa3_2025_01")
    assert "FA3 (flash_attn_interface): head size 12 is not a multiple of 8" in " ".join(alone.refusals(req))


class _HostReads(TorchDispatchMode):
    """Records ops that read a device value back to the host (`.item()`, `int(t)`) or reduce with max."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.max.default):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_key_padding_path_passes_S_and_reads_nothing_back(fake_flash):
    flash = fake_flash("fa2")
    req, _ = _request(k_keep=_padding())
    with _HostReads() as reads:
        out, _ = flash.run(req)
    (call,) = calls("flash_attn")
    assert call["fn"] == "varlen" and call["max_seqlen_k"] == S and call["max_seqlen_q"] == T
    assert reads.ops == []
    torch.testing.assert_close(out.float(), _reference(req), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "key_padding"])
def test_views_of_a_packed_projection_reach_flash_without_copies(fake_flash, padded):
    flash = fake_flash("fa2")
    req, qkv = _request(packed=True, k_keep=_padding() if padded else None)  # self-attention: T = S
    assert not req.q_BTNH.is_contiguous()
    out, _ = flash.run(req)
    (call,) = calls("flash_attn")
    storage = qkv.untyped_storage().data_ptr()
    assert call["q"].untyped_storage().data_ptr() == storage  # the query is never copied
    if not padded:  # (the varlen path gathers the kept keys, which is a copy by design)
        assert call["k"].untyped_storage().data_ptr() == storage and call["v"].untyped_storage().data_ptr() == storage
    torch.testing.assert_close(out.float(), _reference(req), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "key_padding"])
def test_grouped_key_value_heads_through_flash(fake_flash, padded):
    flash = fake_flash("fa2")
    req, _ = _request(K=2, k_keep=_padding() if padded else None)
    out, _ = flash.run(req)
    assert calls("flash_attn")[0]["k"].shape[-2] == 2  # K/V heads are not repeated before the kernel
    torch.testing.assert_close(out.float(), _reference(req), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("capability,call,expected", [
    ((9, 0), {}, "sdpa"),                     # sm90, dense: SDPA (cuDNN) before FA2
    ((10, 0), {}, "sdpa"),
    ((9, 0), {"pad": True}, "flash"),         # key padding: FA2's varlen beats a mask tensor
    ((9, 0), {"dropout": True}, "flash"),     # dropout: FA2 (cuDNN rounds some rates)
    ((8, 0), {}, "flash"),                    # sm80: FA2 first
])
def test_fa2_ranks_after_sdpa_on_sm90_unless_padded_or_dropout(fake_flash, capability, call, expected):
    fake_flash("fa2", capability=capability)
    torch.manual_seed(0)
    layer = MultiHeadAttention(N, H, query_shape=32, dropout=0.1, dtype=torch.bfloat16, seed=1)
    x = torch.randn(B, T, 32, dtype=torch.bfloat16)
    kwargs = {"training": call.get("dropout", False)}
    if call.get("pad"):
        kwargs["value_mask"] = torch.arange(T)[None, :] < torch.tensor([[T], [T // 2]])
    layer(x, x, **kwargs)
    assert layer.last_backend == expected, layer.last_backend_reason


def test_fa3_stays_ahead_of_sdpa_on_sm90(fake_flash):
    fake_flash("fa3_2025_01", capability=(9, 0))
    layer = MultiHeadAttention(N, H, query_shape=32, dtype=torch.bfloat16)
    x = torch.randn(B, T, 32, dtype=torch.bfloat16)
    layer(x, x)
    assert layer.last_backend == "flash"

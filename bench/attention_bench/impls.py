"""The implementations under test, their inputs and the FLOP count of one call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_mha import MultiHeadAttention
from dist_mha.attention.kernels import flash as _flash

from .config import BASELINE
from .timing import Runner


# ----------------------------------------------------------------------------- FLOPs
def attention_flops(B, T, S, E, N, H, Hv=None, causal=False):
    """Forward FLOPs (multiply-add = 2) of one multi-head attention call.

    Q/K/V projections 2*B*T*E*N*H + 2*B*S*E*N*H + 2*B*S*E*N*Hv (self-attention:
    2*B*T*E*3E), scores 2*B*N*T*S*H, weighted sum 2*B*N*T*S*Hv, output
    projection 2*B*T*N*Hv*E. Causal halves the two attention terms.
    Backward is counted as 2x forward (fwd+bwd = 3x).
    """
    Hv = H if Hv is None else Hv
    proj = 2 * B * T * E * N * H + 2 * B * S * E * N * H + 2 * B * S * E * N * Hv
    attn = 2 * B * N * T * S * H + 2 * B * N * T * S * Hv
    if causal:
        attn //= 2
    out = 2 * B * T * N * Hv * E
    return proj + attn + out


# ----------------------------------------------------------------------------- implementations
class FusedBaseline(nn.Module):
    """The hand-fused reference: fused QKV (or Q + fused KV) Linear, SDPA, output Linear."""

    def __init__(self, E, N, cross, device, dtype):
        super().__init__()
        self.N, self.H = N, E // N
        if cross:
            self.q = nn.Linear(E, E, device=device, dtype=dtype)
            self.kv = nn.Linear(E, 2 * E, device=device, dtype=dtype)
        else:
            self.qkv = nn.Linear(E, 3 * E, device=device, dtype=dtype)
        self.out = nn.Linear(E, E, device=device, dtype=dtype)

    def forward(self, x, y=None, attn_mask=None, is_causal=False):
        B, T, E = x.shape
        N, H = self.N, self.H
        if y is None:
            q, k, v = self.qkv(x).view(B, T, 3, N, H).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            S = y.shape[1]
            q = self.q(x).view(B, T, N, H).transpose(1, 2)
            k, v = self.kv(y).view(B, S, 2, N, H).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out(o.transpose(1, 2).reshape(B, T, E))


def _keras():
    import keras  # noqa: F401  (KERAS_BACKEND=torch set at the top)

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"keras backend is {keras.backend.backend()!r}, not torch (set KERAS_BACKEND=torch)")
    return keras


def impl_names(device):
    # dist_mha:flash is listed everywhere; without the package it gets a null record saying so.
    return ["dist_mha:sdpa", "dist_mha:math", "dist_mha:flash", "torch_mha", BASELINE, "keras"]


class Unsupported(Exception):
    """An implementation cannot run a variant; the message is the recorded reason."""


def make_inputs(shape, variant, device, dtype, requires_grad=True):
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, S, E = shape["B"], shape["T"], shape["S"], shape["E"]
    x = torch.randn(B, T, E, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    inp = {"x": x}
    if variant == "cross":
        inp["y"] = torch.randn(B, S, E, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    if variant == "padded":
        # Row b keeps its first T - b*T/(2B) keys: row 0 unpadded, the last about half; never empty.
        lens = torch.tensor([T - b * T // (2 * B) for b in range(B)])
        inp["keep"] = (torch.arange(T)[None, :] < lens[:, None]).to(device)
    if variant == "causal":
        inp["causal_float"] = torch.nn.Transformer.generate_square_subsequent_mask(T, device=device, dtype=dtype)
    return inp


def make_impl(name, shape, variant, device, param_dtype):
    """Returns `(module, call(module, inputs) -> output tensor, params list)`.

    Raises Unsupported with the reason where the implementation cannot do it.
    """
    E, N = shape["E"], shape["N"]
    H = E // N
    torch.manual_seed(0)
    if name == "dist_mha:flash" and not _flash.AVAILABLE:
        raise Unsupported("flash-attn is not installed (dist_mha.attention.kernels.flash.AVAILABLE is False)")
    if name.startswith("dist_mha:"):
        backend = name.split(":")[1]
        backend = None if backend == "auto" else backend
        m = MultiHeadAttention(N, H, query_shape=E, value_shape=E, attention_backend=backend,
                               device=device, dtype=param_dtype)
        calls = {
            "self": lambda m, i: m(i["x"], i["x"]),
            "cross": lambda m, i: m(i["x"], i["y"]),
            "causal": lambda m, i: m(i["x"], i["x"], use_causal_mask=True),
            "padded": lambda m, i: m(i["x"], i["x"], value_mask=i["keep"]),
        }
        return m, calls[variant], list(m.parameters())
    if name == "torch_mha":
        m = nn.MultiheadAttention(E, N, batch_first=True, device=device, dtype=param_dtype)
        calls = {
            "self": lambda m, i: m(i["x"], i["x"], i["x"], need_weights=False)[0],
            "cross": lambda m, i: m(i["x"], i["y"], i["y"], need_weights=False)[0],
            # is_causal is only a hint in nn.MultiheadAttention: the mask must be passed too;
            # with need_weights=False and no key padding it drops the mask and uses SDPA's is_causal.
            "causal": lambda m, i: m(i["x"], i["x"], i["x"], attn_mask=i["causal_float"], is_causal=True,
                                     need_weights=False)[0],
            "padded": lambda m, i: m(i["x"], i["x"], i["x"], key_padding_mask=~i["keep"], need_weights=False)[0],
        }
        return m, calls[variant], list(m.parameters())
    if name == BASELINE:
        m = FusedBaseline(E, N, variant == "cross", device, param_dtype)
        calls = {
            "self": lambda m, i: m(i["x"]),
            "cross": lambda m, i: m(i["x"], i["y"]),
            "causal": lambda m, i: m(i["x"], is_causal=True),
            "padded": lambda m, i: m(i["x"], attn_mask=i["keep"][:, None, None, :]),
        }
        return m, calls[variant], list(m.parameters())
    if name == "keras":
        if torch.device(device).type != "cpu":
            raise Unsupported("keras is benchmarked on CPU only")
        try:
            keras = _keras()
        except Exception as err:  # not installed / wrong backend
            raise Unsupported(f"keras not importable: {type(err).__name__}: {err}") from err
        dtype_name = str(param_dtype).replace("torch.", "")
        m = keras.layers.MultiHeadAttention(N, H, dtype=dtype_name)
        calls = {
            "self": lambda m, i: m(i["x"], i["x"]),
            "cross": lambda m, i: m(i["x"], i["y"]),
            "causal": lambda m, i: m(i["x"], i["x"], use_causal_mask=True),
            "padded": lambda m, i: m(i["x"], i["x"], value_mask=i["keep"]),
        }
        # Build on a tiny batch of the right feature sizes; keras variables hold torch Parameters.
        tiny = {"x": torch.zeros(1, 2, E, device=device, dtype=param_dtype)}
        tiny["y"] = tiny["x"]
        with torch.no_grad():
            m(tiny["x"], tiny["y"])
        params = [w.value for w in m.weights]
        return m, calls[variant], params
    raise ValueError(name)


def auto_backend(shape, variant, device, dtype, autocast=None):
    """What dist_mha's default dispatch (flash_attention=None) picks for this call."""
    inp = make_inputs(dict(shape, B=1), variant, device, dtype, requires_grad=False)
    m, call, params = make_impl("dist_mha:auto", shape, variant, device, dtype)
    Runner("auto", m, call, params, inp, autocast).fwd()
    return m.last_backend

"""Behaviour of `dist_mha.MultiHeadAttention` as a torch module, on CPU.

Expected values come from an independent float64 numpy implementation of
multi-head attention (`reference`), from the README's stated formulas
(Glorot limits, fans, constraint definitions, L2 gradients), or from
comparisons between two runs of the layer that must agree by construction
(same seed, same weights). Nothing is compared to a value the layer itself
produced in the same configuration being tested.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dist_mha import MultiHeadAttention
from dist_mha.keras_objects.initializers import GlorotUniform

N, H = 2, 4  # heads, key_dim
B, T, S, D = 2, 5, 7, 8
BACKENDS = ["sdpa", "math"]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def random_weights(layer, seed=0, scale=0.5):
    """Random arrays (biases included, so the output bias is not zero) in get_weights() shapes."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(w.shape) * scale).astype(np.float32) for w in layer.get_weights()]


def make_layer(wseed=0, dq=D, dv=D, dk=None, **kwargs):
    """A built layer with random weights from `wseed`; other kwargs (`seed` too) go to the layer."""
    kwargs.setdefault("num_heads", N)
    kwargs.setdefault("key_dim", H)
    layer = MultiHeadAttention(
        query_shape=(None, None, dq), value_shape=(None, None, dv),
        key_shape=None if dk is None else (None, None, dk), **kwargs,
    )
    layer.set_weights(random_weights(layer, wseed))
    return layer


def make_inputs(seed=0, b=B, t=T, s=S, dq=D, dv=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, dq, generator=g), torch.randn(b, s, dv, generator=g)


def reference(weights, query, value, key=None, keep=None):
    """Multi-head attention in float64 numpy, written from the Keras formulas.

    Args:
        weights: [Wq (D,N,H), bq, Wk, bk, Wv (D,N,Hv), bv, Wo (N,Hv,O), bo].
        query (B,T,Dq), value (B,S,Dv), key (B,S,Dk) or None.
        keep: bool broadcastable to (B, T, S); rows with no key get a zero context.

    Returns:
        (output (B,T,O), probabilities (B,N,T,S)).
    """
    Wq, bq, Wk, bk, Wv, bv, Wo, bo = (np.asarray(w, np.float64) for w in weights)
    f64 = lambda x: np.asarray(x.detach().double() if isinstance(x, torch.Tensor) else x, np.float64)  # noqa: E731
    q, v = f64(query), f64(value)
    k = v if key is None else f64(key)
    Q = np.einsum("btd,dnh->btnh", q, Wq) + bq
    K = np.einsum("bsd,dnh->bsnh", k, Wk) + bk
    V = np.einsum("bsd,dnh->bsnh", v, Wv) + bv
    logits = np.einsum("btnh,bsnh->bnts", Q, K) / math.sqrt(Wq.shape[-1])
    if keep is not None:
        keep = np.broadcast_to(np.asarray(keep, bool)[:, None], logits.shape)
        logits = np.where(keep, logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(logits - top)
    denom = e.sum(axis=-1, keepdims=True)
    p = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
    ctx = np.einsum("bnts,bsnh->btnh", p, V)
    out = np.einsum("btnh,nho->bto", ctx, Wo) + bo
    return out, p


def np_(x):
    return x.detach().double().numpy()


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_call_input_dtype_output_has_input_dtype_and_matches_float64_reference(dtype, backend):
    layer = make_layer(attention_backend=backend).eval()
    x, v = make_inputs()
    x, v = x.to(dtype), v.to(dtype)
    out = layer(x, v)
    assert out.dtype == dtype
    assert layer.last_backend == backend
    # The layer casts its float32 weights to the input dtype, so the reference uses the
    # weights rounded to that dtype: what is left is the rounding of the computation.
    w = [torch.from_numpy(a).to(dtype).double().numpy() for a in layer.get_weights()]
    ref, _ = reference(w, x, v)
    scale = np.abs(ref).max()
    if dtype in (torch.float16, torch.bfloat16):
        # Several chained roundings (projections, scores, softmax, context, output) in a
        # format with unit roundoff eps/2; a final rounding of an O(scale) output alone
        # is eps/2*scale. 2*eps*scale allows ~4 such roundings: 0.05 for bf16 (observed
        # 0.013), 0.006 for fp16 (observed 0.0015). A wrong mask/scale/head split is O(1).
        tol = 2 * torch.finfo(dtype).eps * scale
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(np_(out), ref, atol=tol, rtol=0)


def test_build_float64_weights_match_float32_layer_within_1e5():
    w = random_weights(make_layer())
    l32 = make_layer().eval()
    l32.set_weights(w)
    l64 = make_layer(dtype=torch.float64).eval()
    l64.set_weights(w)
    assert all(p.dtype == torch.float64 for p in l64.parameters())
    x, v = make_inputs()
    out64 = l64(x.double(), v.double())
    assert out64.dtype == torch.float64
    np.testing.assert_allclose(np_(out64), np_(l32(x, v)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np_(out64), reference(w, x.double(), v.double())[0], atol=1e-12, rtol=0)


def test_module_to_float64_converts_parameters_and_matches_reference():
    layer = make_layer().eval()
    w = layer.get_weights()
    layer.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    x, v = make_inputs()
    out = layer(x.double(), v.double())
    assert out.dtype == torch.float64
    np.testing.assert_allclose(np_(out), reference(w, x, v)[0], atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------
# training semantics
# --------------------------------------------------------------------------------------
def test_call_training_none_follows_module_mode():
    layer = make_layer(dropout=0.5, seed=1)
    x, v = make_inputs()
    assert layer.training  # a fresh torch module is in training mode
    a, b = layer(x, v), layer(x, v)
    assert not torch.equal(a, b)  # dropout active: two draws differ
    layer.eval()
    c, d = layer(x, v), layer(x, v)
    assert torch.equal(c, d)
    np.testing.assert_allclose(np_(c), reference(layer.get_weights(), x, v)[0], atol=1e-5, rtol=0)
    layer.train()
    assert not torch.equal(layer(x, v), c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_training_false_is_deterministic_and_equals_no_dropout(backend):
    with_dropout = make_layer(dropout=0.5, seed=3, attention_backend=backend)  # train mode
    no_dropout = make_layer(dropout=0.0, attention_backend=backend)
    no_dropout.set_weights(with_dropout.get_weights())
    x, v = make_inputs()
    a = with_dropout(x, v, training=False)
    b = with_dropout(x, v, training=False)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, no_dropout(x, v), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_training_true_with_dropout_differs_from_eval(backend):
    layer = make_layer(dropout=0.3, seed=3, attention_backend=backend).eval()
    x, v = make_inputs()
    ev = layer(x, v)
    tr = layer(x, v, training=True)
    assert tr.shape == ev.shape
    assert (tr - ev).abs().max() > 1e-3


def test_call_dropout_is_inverted_mean_over_draws_equals_eval():
    # 4000 independent dropout draws (one per batch element): with inverted dropout
    # (kept probabilities divided by 1-p) E[output] = eval output; without the 1/(1-p)
    # the mean would shrink the context by (1-p) = 0.5.
    layer = make_layer(dropout=0.5, seed=5, attention_backend="math")
    x, v = make_inputs(b=1)
    xs, vs = x.expand(4000, -1, -1), v.expand(4000, -1, -1)
    mean = layer(xs, vs, training=True).double().mean(0)
    ev = layer(x, v, training=False)[0].double()
    bias = torch.from_numpy(layer.get_weights()[-1]).double()
    ctx_scale = (ev - bias).abs().max()
    assert (mean - ev).abs().max() < 0.1 * ctx_scale


def test_call_dropout_returned_scores_are_pre_dropout_probabilities():
    layer = make_layer(dropout=0.5, seed=2, attention_backend="math")
    x, v = make_inputs()
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, :3] = False
    keep[1, -1] = False
    out, scores = layer(x, v, value_mask=keep, return_attention_scores=True, training=True)
    assert layer.last_backend == "math"
    assert scores.shape == (B, N, T, S)
    sums = scores.double().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-6)
    assert torch.all(scores.masked_select(~keep[:, None, None, :].expand_as(scores)) == 0)
    _, ref_p = reference(layer.get_weights(), x, v, keep=keep.numpy()[:, None, :])
    np.testing.assert_allclose(np_(scores), ref_p, atol=1e-6, rtol=0)
    # The output itself was computed with dropped probabilities.
    ev_out = layer(x, v, value_mask=keep, training=False)
    assert (out - ev_out).abs().max() > 1e-3


# --------------------------------------------------------------------------------------
# dropout seeds
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_call_same_seed_same_weights_identical_dropout(backend):
    a = make_layer(dropout=0.5, seed=11, attention_backend=backend)
    b = make_layer(dropout=0.5, seed=11, attention_backend=backend)
    x, v = make_inputs()
    torch.manual_seed(0)
    a1, a2 = a(x, v, training=True), a(x, v, training=True)
    torch.manual_seed(12345)  # the global seed must not matter
    b1 = b(x, v, training=True)
    torch.rand(100)  # nor draws from the global generator in between
    b2 = b(x, v, training=True)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # successive calls draw new masks
    c = make_layer(dropout=0.5, seed=12, attention_backend=backend)
    assert not torch.equal(c(x, v, training=True), a1)  # another seed, other masks


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_seeded_dropout_leaves_global_rng_untouched(backend):
    layer = make_layer(dropout=0.5, seed=4, attention_backend=backend)
    x, v = make_inputs()
    torch.manual_seed(99)
    expected = torch.rand(16)
    torch.manual_seed(99)
    layer(x, v, training=True)
    assert torch.equal(torch.rand(16), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_unseeded_dropout_follows_torch_manual_seed(backend):
    layer = make_layer(dropout=0.5, seed=None, attention_backend=backend)
    x, v = make_inputs()
    torch.manual_seed(7)
    a = layer(x, v, training=True)
    torch.manual_seed(7)
    b = layer(x, v, training=True)
    c = layer(x, v, training=True)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


# --------------------------------------------------------------------------------------
# build, properties
# --------------------------------------------------------------------------------------
def test_call_lazy_build_infers_shapes_from_inputs():
    layer = MultiHeadAttention(num_heads=3, key_dim=4, value_dim=5)
    assert not layer.built and list(layer.parameters()) == [] and layer.weights == []
    with pytest.raises(AttributeError):
        layer.query_dense
    q, v, k = torch.randn(2, 4, 6), torch.randn(2, 7, 10), torch.randn(2, 7, 3)
    out = layer(q, v, key=k)
    assert layer.built
    assert out.shape == (2, 4, 6)
    assert tuple(layer.query_dense.kernel.shape) == (6, 3, 4)
    assert tuple(layer.key_dense.kernel.shape) == (3, 3, 4)
    assert tuple(layer.value_dense.kernel.shape) == (10, 3, 5)
    assert tuple(layer.output_dense.kernel.shape) == (3, 5, 6)
    assert tuple(layer.output_dense.bias.shape) == (6,)
    assert len(list(layer.parameters())) == 8


def test_build_query_shape_int_shorthand_builds_with_that_feature_size():
    layer = MultiHeadAttention(num_heads=8, key_dim=64, query_shape=512)
    assert layer.built
    assert tuple(layer.query_dense.kernel.shape) == (512, 8, 64)
    assert tuple(layer.key_dense.kernel.shape) == (512, 8, 64)
    assert tuple(layer.value_dense.kernel.shape) == (512, 8, 64)
    assert tuple(layer.output_dense.kernel.shape) == (8, 64, 512)
    assert sum(p.numel() for p in layer.parameters()) == 4 * 512 * 512 + 3 * 512 + 512
    out = layer(torch.randn(1, 3, 512), torch.randn(1, 4, 512))
    assert out.shape == (1, 3, 512)


def test_build_eager_creates_parameters_for_optimizer():
    layer = MultiHeadAttention(num_heads=2, key_dim=4, query_shape=(None, None, 6), value_shape=(None, None, 10))
    params = list(layer.parameters())
    assert len(params) == 8 and all(p.requires_grad for p in params)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in params]
    layer(torch.randn(2, 3, 6), torch.randn(2, 4, 10)).square().sum().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))


def test_properties_return_constructor_values_and_keras_kernel_shapes():
    layer = MultiHeadAttention(
        num_heads=3, key_dim=5, value_dim=7, dropout=0.25, use_bias=False, output_shape=(2, 4),
        query_shape=(None, None, 6), value_shape=(None, None, 9), key_shape=(None, None, 11),
    )
    assert (layer.num_heads, layer.key_dim, layer.value_dim) == (3, 5, 7)
    assert layer.dropout == 0.25 and isinstance(layer.dropout, float)
    assert layer.use_bias is False
    assert tuple(layer.attention_axes) == (1,)
    assert tuple(layer.query_dense.kernel.shape) == (6, 3, 5)
    assert tuple(layer.key_dense.kernel.shape) == (11, 3, 5)
    assert tuple(layer.value_dense.kernel.shape) == (9, 3, 7)
    assert tuple(layer.output_dense.kernel.shape) == (3, 7, 2, 4)
    assert all(m.bias is None for m in (layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense))
    assert layer.query_dense.kernel is layer.weights[0]
    assert layer.output_dense.kernel is layer.weights[-1]
    out = layer(torch.randn(2, 3, 6), torch.randn(2, 4, 9), key=torch.randn(2, 4, 11))
    assert out.shape == (2, 3, 2, 4)


def test_properties_defaults_value_dim_equals_key_dim():
    layer = MultiHeadAttention(num_heads=2, key_dim=6)
    assert layer.value_dim == 6 and layer.dropout == 0.0 and layer.use_bias is True
    assert layer.attention_axes is None


def test_properties_attention_axes_given_int_becomes_tuple():
    layer = MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=2, query_shape=(None, 3, 4, 8))
    assert tuple(layer.attention_axes) == (2,)


@pytest.mark.parametrize("name", ["query_dense", "key_dense", "value_dense", "output_dense"])
def test_properties_dense_before_build_raises_attribute_error(name):
    layer = MultiHeadAttention(num_heads=2, key_dim=4)
    with pytest.raises(AttributeError):
        getattr(layer, name)
    assert not hasattr(layer, name)


# --------------------------------------------------------------------------------------
# state, trainable
# --------------------------------------------------------------------------------------
def test_state_dict_round_trip_into_new_layer_gives_identical_outputs():
    src = make_layer(wseed=3).eval()
    dst = MultiHeadAttention(num_heads=N, key_dim=H, query_shape=(None, None, D)).eval()
    x, v = make_inputs()
    assert not torch.equal(src(x, v), dst(x, v))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(src(x, v), dst(x, v))
    for a, b in zip(src.get_weights(), dst.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_trainable_false_freezes_parameters():
    layer = make_layer(trainable=False)
    assert layer.trainable is False
    assert all(not p.requires_grad for p in layer.parameters())
    x, v = make_inputs()
    x.requires_grad_(True)
    layer(x, v).sum().backward()
    assert x.grad is not None
    assert all(p.grad is None for p in layer.parameters())
    layer.trainable = True
    assert all(p.requires_grad for p in layer.parameters())


def test_trainable_false_lazy_build_freezes_parameters():
    layer = MultiHeadAttention(num_heads=2, key_dim=4, trainable=False)
    x, v = make_inputs()
    layer(x, v)
    assert len(list(layer.parameters())) == 8
    assert all(not p.requires_grad for p in layer.parameters())


# --------------------------------------------------------------------------------------
# constraints
# --------------------------------------------------------------------------------------
def _kernels_and_biases(layer):
    mods = [layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense]
    return [m.kernel for m in mods], [m.bias for m in mods]


def test_apply_constraints_non_neg_clamps_kernels_leaves_biases():
    layer = make_layer(kernel_constraint="non_neg")
    kernels, biases = _kernels_and_biases(layer)
    k_before = [k.detach().clone() for k in kernels]
    b_before = [b.detach().clone() for b in biases]
    assert all((k < 0).any() for k in k_before) and all((b < 0).any() for b in b_before)
    layer.apply_constraints()
    for k, kb in zip(kernels, k_before):
        assert torch.equal(k.detach(), torch.where(kb > 0, kb, torch.zeros_like(kb)))
    for b, bb in zip(biases, b_before):
        assert torch.equal(b.detach(), bb)


def test_constraint_hook_applies_after_step_until_removed():
    layer = make_layer(kernel_constraint="non_neg")
    kernels, biases = _kernels_and_biases(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)

    def step():
        opt.zero_grad()
        # d/dw of sum(w) is 1: every weight moves down by lr=1, most become negative.
        sum(p.sum() for p in layer.parameters()).backward()
        opt.step()

    handle = layer.constraint_hook(opt)
    step()
    assert all((k >= 0).all() for k in kernels)
    assert any((b < 0).any() for b in biases)  # biases are not constrained
    handle.remove()
    step()
    assert all((k < 0).any() for k in kernels)


def test_apply_constraints_max_norm_bounds_column_norms_over_axis0():
    layer = make_layer(kernel_constraint="max_norm")
    kernels, _ = _kernels_and_biases(layer)
    with torch.no_grad():
        for k in kernels:
            k.mul_(torch.linspace(0.1, 10.0, k[0].numel()).reshape(k[0].shape))  # some columns < 2, some > 2
    before = [k.detach().clone() for k in kernels]
    layer.apply_constraints()
    for k, kb in zip(kernels, before):
        norms_before = torch.linalg.vector_norm(kb, dim=0)
        norms = torch.linalg.vector_norm(k.detach(), dim=0)  # per (head, dim) column for q/k/v
        assert (norms_before > 2).any() and (norms_before < 2).any()
        assert torch.all(norms <= 2 + 1e-5)
        big = norms_before > 2
        torch.testing.assert_close(norms[big], torch.full_like(norms[big], 2.0), rtol=0, atol=1e-5)
        # Short columns are left (up to Keras's epsilon in the denominator), directions kept.
        torch.testing.assert_close(k.detach()[:, ~big], kb[:, ~big], rtol=1e-5, atol=1e-6)
        ratio = k.detach() / kb
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------
def test_build_glorot_uniform_limits_use_einsum_fans():
    n, h, hv = 8, 32, 16
    dq, dk, dv = 128, 64, 192
    out_shape = (4, 24)
    torch.manual_seed(0)
    layer = MultiHeadAttention(
        num_heads=n, key_dim=h, value_dim=hv, output_shape=out_shape,
        query_shape=(None, None, dq), value_shape=(None, None, dv), key_shape=(None, None, dk),
    )
    expected = {
        "query": math.sqrt(6 / (dq + n * h)),
        "key": math.sqrt(6 / (dk + n * h)),
        "value": math.sqrt(6 / (dv + n * hv)),
        "output": math.sqrt(6 / (n * hv + math.prod(out_shape))),
    }
    kernels = dict(zip(expected, _kernels_and_biases(layer)[0]))
    for name, limit in expected.items():
        w = kernels[name].detach().double()
        assert w.numel() >= 12000
        top = w.abs().max().item()
        assert top <= limit, (name, top, limit)
        assert top >= 0.9 * limit, (name, top, limit)
        # A uniform on [-L, L] has std L/sqrt(3).
        assert abs(w.std().item() - limit / math.sqrt(3)) < 0.05 * limit / math.sqrt(3), name
        assert abs(w.mean().item()) < 0.05 * limit, name
    _, biases = _kernels_and_biases(layer)
    assert all(torch.all(b == 0) for b in biases)


def test_build_kernel_initializer_int_seed_reproducible_and_distinct_per_kernel():
    def build():
        return MultiHeadAttention(
            num_heads=2, key_dim=8, kernel_initializer=GlorotUniform(seed=42), query_shape=(None, None, 16)
        )

    torch.manual_seed(1)
    a = build()
    torch.manual_seed(2)  # the int seed, not the global RNG, decides
    b = build()
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert a.query_dense.kernel.shape == a.key_dense.kernel.shape == a.value_dense.kernel.shape
    assert not torch.equal(a.query_dense.kernel, a.key_dense.kernel)
    assert not torch.equal(a.query_dense.kernel, a.value_dense.kernel)
    assert not torch.equal(a.key_dense.kernel, a.value_dense.kernel)
    c = MultiHeadAttention(
        num_heads=2, key_dim=8, kernel_initializer=GlorotUniform(seed=43), query_shape=(None, None, 16)
    )
    assert not torch.equal(a.query_dense.kernel, c.query_dense.kernel)


def test_build_kernel_initializer_config_dict_seed_reproducible():
    init = {"class_name": "RandomNormal", "config": {"seed": 7, "mean": 0.0, "stddev": 1.0}}
    torch.manual_seed(1)
    a = MultiHeadAttention(num_heads=2, key_dim=8, kernel_initializer=init, query_shape=16)
    torch.manual_seed(2)
    b = MultiHeadAttention(num_heads=2, key_dim=8, kernel_initializer=dict(init), query_shape=16)
    assert torch.equal(a.query_dense.kernel, b.query_dense.kernel)
    assert not torch.equal(a.query_dense.kernel, a.key_dense.kernel)


def test_build_unseeded_initializer_follows_torch_manual_seed():
    torch.manual_seed(5)
    a = MultiHeadAttention(num_heads=2, key_dim=8, query_shape=16)
    torch.manual_seed(5)
    b = MultiHeadAttention(num_heads=2, key_dim=8, query_shape=16)
    torch.manual_seed(6)
    c = MultiHeadAttention(num_heads=2, key_dim=8, query_shape=16)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert not torch.equal(a.query_dense.kernel, c.query_dense.kernel)
    assert not torch.equal(a.query_dense.kernel, a.key_dense.kernel)


# --------------------------------------------------------------------------------------
# regularizers
# --------------------------------------------------------------------------------------
def test_losses_weight_regularizer_backward_gives_l2_gradient():
    layer = make_layer(kernel_regularizer="l2")  # Keras's default l2 = 0.01
    losses = layer.losses
    assert len(losses) == 4  # one per kernel, no call yet so no activity penalty
    total = sum(losses)
    kernels, biases = _kernels_and_biases(layer)
    expected_total = sum(0.01 * k.detach().double().square().sum() for k in kernels)
    assert abs(total.item() - expected_total.item()) < 1e-4 * expected_total.item()
    total.backward()
    for k in kernels:
        torch.testing.assert_close(k.grad, 0.02 * k.detach(), rtol=1e-5, atol=1e-7)
    assert all(b.grad is None for b in biases)


def test_losses_activity_regularizer_backward_reaches_kernels():
    layer = make_layer(activity_regularizer="l1", bias_regularizer="l2")
    x, v = make_inputs()
    layer(x, v)
    losses = layer.losses
    assert len(losses) == 4 + 4  # q, k, v, output activity penalties, then 4 bias penalties
    sum(losses).backward()
    kernels, biases = _kernels_and_biases(layer)
    for p in kernels + biases:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# return_attention_scores shapes
# --------------------------------------------------------------------------------------
def test_call_scores_rank3_shape_is_BNTS_and_matches_reference():
    layer = make_layer()
    x, v = make_inputs()
    out, scores = layer(x, v, return_attention_scores=True)
    assert out.shape == (B, T, D)
    assert scores.shape == (B, N, T, S)
    ref_out, ref_p = reference(layer.get_weights(), x, v)
    np.testing.assert_allclose(np_(scores), ref_p, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np_(out), ref_out, atol=1e-5, rtol=0)


def test_call_scores_rank4_axis2_shape_is_BXNTS_and_matches_per_slice():
    X = 3
    layer4 = MultiHeadAttention(num_heads=N, key_dim=H, attention_axes=(2,), query_shape=(None, X, None, D))
    layer4.set_weights(random_weights(layer4, 4))
    g = torch.Generator().manual_seed(4)
    q, v = torch.randn(B, X, T, D, generator=g), torch.randn(B, X, S, D, generator=g)
    out, scores = layer4(q, v, return_attention_scores=True)
    assert out.shape == (B, X, T, D)
    assert scores.shape == (B, X, N, T, S)
    for i in range(X):  # attention over dim 2 only: each slice along dim 1 is independent
        ref_out, ref_p = reference(layer4.get_weights(), q[:, i], v[:, i])
        np.testing.assert_allclose(np_(scores[:, i]), ref_p, atol=1e-6, rtol=0)
        np.testing.assert_allclose(np_(out[:, i]), ref_out, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# fully masked rows
# --------------------------------------------------------------------------------------
def _mask_case(case):
    """Call kwargs and the (B, T, S) keep mask they mean, with known fully-masked rows."""
    if case == "value_mask_batch_empty":
        vm = torch.ones(B, S, dtype=torch.bool)
        vm[0] = False  # batch element 0 has no key at all
        vm[1, :2] = False
        return dict(value_mask=vm), vm[:, None, :].expand(B, T, S), [(0, t) for t in range(T)]
    if case == "attention_mask_row_empty":
        am = torch.rand(B, T, S, generator=torch.Generator().manual_seed(3)) > 0.3
        am[:, :, 0] = True
        am[:, 1] = False  # query row 1 has no key in either batch element
        am[0, 3] = False
        return dict(attention_mask=am), am, [(0, 1), (1, 1), (0, 3)]
    if case == "query_mask_false":
        qm = torch.ones(B, T, dtype=torch.bool)
        qm[0, 2] = False
        qm[1, 0] = False
        return dict(query_mask=qm), qm[:, :, None].expand(B, T, S), [(0, 2), (1, 0)]
    raise AssertionError(case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["value_mask_batch_empty", "attention_mask_row_empty", "query_mask_false"])
def test_call_fully_masked_rows_output_bias_and_no_nan(case, backend):
    layer = make_layer(attention_backend=backend)
    x, v = make_inputs()
    x.requires_grad_(True)
    v.requires_grad_(True)
    kwargs, keep, empty_rows = _mask_case(case)
    out = layer(x, v, **kwargs, training=False)
    assert layer.last_backend == backend
    assert torch.isfinite(out).all()
    bias = layer.output_dense.bias.detach()
    for b, t in empty_rows:
        torch.testing.assert_close(out[b, t].detach(), bias, rtol=0, atol=1e-6)
    ref_out, _ = reference(layer.get_weights(), x, v, keep=keep.numpy())
    np.testing.assert_allclose(np_(out), ref_out, atol=1e-5, rtol=0)
    # Gradients stay finite through the masked rows.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * w).sum().backward()
    for t in [x.grad, v.grad] + [p.grad for p in layer.parameters()]:
        assert t is not None and torch.isfinite(t).all()


@pytest.mark.parametrize("case", ["value_mask_batch_empty", "attention_mask_row_empty", "query_mask_false"])
def test_call_fully_masked_rows_scores_are_zero(case):
    layer = make_layer()
    x, v = make_inputs()
    kwargs, _, empty_rows = _mask_case(case)
    _, scores = layer(x, v, **kwargs, return_attention_scores=True)
    assert torch.isfinite(scores).all()
    for b, t in empty_rows:
        assert torch.all(scores[b, :, t] == 0)


# --------------------------------------------------------------------------------------
# backend reporting
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_last_backend_cpu_plain_call_is_sdpa_and_scores_call_is_math():
    layer = make_layer()
    assert layer.last_backend is None
    x, v = make_inputs()
    layer(x, v)
    assert layer.last_backend == "sdpa"
    reason = layer.last_backend_reason
    assert "flash:" in reason
    flash_part = reason.split("flash:", 1)[1].split(";", 1)[0]
    assert "CUDA" in flash_part or "not installed" in flash_part, reason
    assert "sdpa: ok" in reason
    layer(x, v, return_attention_scores=True)
    assert layer.last_backend == "math"
    assert "return_attention_scores" in layer.last_backend_reason.split("sdpa:", 1)[1].split(";", 1)[0]
    layer(x.half(), v.half())
    assert layer.last_backend == "sdpa"

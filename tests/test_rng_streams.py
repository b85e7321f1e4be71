"""Dropout RNG streams: isolation from the global RNG, checkpoint recompute, save/restore."""

from __future__ import annotations

import pytest
import torch

from dist_mha import MultiHeadAttention
from dist_mha.rng.streams import RecomputeError, RNGStream, checkpoint, collect_streams


def _layer(mode="per_rank", seed=3):
    torch.manual_seed(0)
    return MultiHeadAttention(4, 8, dropout=0.4, seed=seed, query_shape=16, dropout_mode=mode,
                              attention_backend="math", dtype=torch.float64)


def _x():
    return torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_stream_fork_leaves_global_rng_untouched():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    stream = RNGStream(7)
    with stream.fork("cpu"):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    assert not torch.equal(inside, expected)


def test_stream_successive_forks_continue_the_sequence():
    a, b = RNGStream(7), RNGStream(7)
    with a.fork("cpu"):
        first = torch.rand(4)
        second = torch.rand(4)
    with b.fork("cpu"):
        b_first = torch.rand(4)
    with b.fork("cpu"):
        b_second = torch.rand(4)
    assert torch.equal(first, b_first) and torch.equal(second, b_second)


def _grads_with_and_without_checkpoint(mode, how=None):
    results = []
    for use_ckpt in (False, True):
        layer = _layer(mode)
        x = _x().requires_grad_()
        if use_ckpt and how is None:
            out = checkpoint(lambda t: layer(t, t, training=True), x, streams=collect_streams(layer))
        elif use_ckpt:
            out = how(lambda t: layer(t, t, training=True), x)
        else:
            out = layer(x, x, training=True)
        out.pow(2).sum().backward()
        results.append((out.detach(), x.grad, [p.grad for p in layer.weights], layer(x, x, training=True).detach()))
    return results


def test_checkpoint_recompute_replays_dropout_masks():
    for mode in ("per_rank", "tp_invariant"):
        (o1, g1, w1, n1), (o2, g2, w2, n2) = _grads_with_and_without_checkpoint(mode)
        assert torch.equal(o1, o2)
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
        for a, b in zip(w1, w2):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        # The call after the checkpointed one sees the stream where it left off.
        assert torch.equal(n1, n2)


def _deepspeed_checkpoint(fn, x):
    ds = pytest.importorskip("deepspeed.runtime.activation_checkpointing.checkpointing")
    return ds.checkpoint(fn, x)


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, t):
        return self.fn(t)


def _fsdp_wrapper(fn, x):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return checkpoint_wrapper(_Fn(fn))(x)


def _composable(fn, x):
    from torch.distributed._composable import checkpoint as composable_checkpoint

    return composable_checkpoint(_Fn(fn))(x)


# Non-reentrant: the recomputation runs under a hook naming its region, so the streams replay it.
REPLAYED_CHECKPOINTS = {
    "torch_non_reentrant": lambda fn, x: torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False),
    "fsdp_checkpoint_wrapper": _fsdp_wrapper,
    "composable_checkpoint": _composable,
}
# Reentrant: the forward is re-run inside backward with nothing that says which forward it repeats.
UNREPLAYABLE_CHECKPOINTS = {
    "torch_reentrant": lambda fn, x: torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=True),
    "deepspeed": _deepspeed_checkpoint,
}
FOREIGN_CHECKPOINTS = {**REPLAYED_CHECKPOINTS, **UNREPLAYABLE_CHECKPOINTS}


@pytest.mark.parametrize("mode", ["per_rank", "tp_invariant"])
@pytest.mark.parametrize("how", list(REPLAYED_CHECKPOINTS))
def test_plain_non_reentrant_checkpoints_replay_dropout_masks(how, mode):
    (o1, g1, w1, n1), (o2, g2, w2, n2) = _grads_with_and_without_checkpoint(mode, REPLAYED_CHECKPOINTS[how])
    assert torch.equal(o1, o2)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
    for a, b in zip(w1, w2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.equal(n1, n2)  # the next call continues the stream where the forward left it


def test_replay_matches_each_recomputed_region_to_its_own_forward():
    # One layer called in two checkpointed regions and once outside: each recomputation draws its own masks.
    grads = []
    for use_ckpt in (False, True):
        layer = _layer()
        x = _x().requires_grad_()
        run = (lambda t: torch.utils.checkpoint.checkpoint(lambda u: layer(u, u, training=True), t,
                                                           use_reentrant=False)) if use_ckpt else \
            (lambda t: layer(t, t, training=True))
        out = run(run(x)) + layer(x, x, training=True)
        out.pow(2).sum().backward()
        grads.append((x.grad, [p.grad for p in layer.weights]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-12)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["per_rank", "tp_invariant"])
@pytest.mark.parametrize("how", list(UNREPLAYABLE_CHECKPOINTS))
def test_recompute_outside_the_stream_replay_raises_instead_of_changing_masks(how, mode):
    # Without replay the recomputed masks differ from the forward's: the
    # gradients would silently belong to another network.
    layer = _layer(mode)
    x = _x().requires_grad_()
    out = FOREIGN_CHECKPOINTS[how](lambda t: layer(t, t, training=True), x)
    with pytest.raises(RecomputeError, match=r"use_reentrant=False"):
        out.pow(2).sum().backward()


@pytest.mark.parametrize("how", list(FOREIGN_CHECKPOINTS))
def test_foreign_checkpoint_without_dropout_is_fine(how):
    layer = _layer()
    x = _x().requires_grad_()
    out = FOREIGN_CHECKPOINTS[how](lambda t: layer(t, t, training=False), x)
    out.pow(2).sum().backward()
    ref = x.detach().clone().requires_grad_()
    layer(ref, ref, training=False).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=1e-12)


def test_a_stream_left_out_of_the_explicit_replay_is_replayed_too():
    (o1, g1, w1, _), _ = _grads_with_and_without_checkpoint("per_rank")
    layer = _layer()
    x = _x().requires_grad_()
    others = [s for s in collect_streams(layer) if s.name != "attention_dropout"]
    out = checkpoint(lambda t: layer(t, t, training=True), x, streams=others)
    out.pow(2).sum().backward()
    assert torch.equal(out.detach(), o1)
    torch.testing.assert_close(x.grad, g1, rtol=0, atol=1e-12)


def test_state_dict_restores_dropout_streams():
    for mode in ("per_rank", "tp_invariant"):
        layer = _layer(mode)
        x = _x()
        layer(x, x, training=True)
        saved = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in layer.state_dict().items()}
        expected = layer(x, x, training=True)
        fresh = _layer(mode, seed=99)
        fresh.load_state_dict(saved)
        assert torch.equal(fresh(x, x, training=True), expected)


def test_state_dict_loads_with_weights_only(tmp_path):
    layer = _layer()
    x = _x()
    layer(x, x, training=True)
    torch.save(layer.state_dict(), tmp_path / "l.pt")
    loaded = torch.load(tmp_path / "l.pt", weights_only=True)
    fresh = _layer(seed=1)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh(x, x, training=True), layer(x, x, training=True))


def test_tp_invariant_mode_differs_between_calls_and_seeds():
    x = _x()
    a, b = _layer("tp_invariant"), _layer("tp_invariant", seed=4)
    first, second = a(x, x, training=True), a(x, x, training=True)
    assert not torch.equal(first, second)
    assert not torch.equal(first, b(x, x, training=True))

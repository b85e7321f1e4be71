"""Picks the attention kernel for a call and says why.

Order of preference: flash-attn, then varlen (CPU, ragged batches: only
when its plan saves enough work, `varlen.worthwhile`), then SDPA, then the
exact math path, except that on sm90 and newer SDPA goes before FA2 unless the
call is key-padded or has dropout (`flash.ranks_after_sdpa`), and that
compiled CPU dropout drawn from a layer's RNG stream prefers the math path
(`_stream_dropout_on_cpu`). Each backend lists its reasons for refusing an
input; a forced backend that refuses raises a ValueError with every backend's
reasons, so the user sees exactly what to change.
"""

from __future__ import annotations

import logging

import torch

from dist_mha.attention.kernels import flash, math, sdpa, varlen
from dist_mha.attention.kernels.request import AttentionRequest

logger = logging.getLogger("dist_mha")

BACKENDS = {b.NAME: b for b in (flash, varlen, sdpa, math)}


def _explain(reasons: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(r) if r else 'ok'}" for name, r in reasons.items())


def _stream_dropout_on_cpu(req: AttentionRequest) -> bool:
    """Compiled CPU dropout from a layer's RNG stream: the math path before SDPA.

    On CPU, SDPA with dropout runs torch's own math kernel (the same cost as
    dist_mha's), drawing from the default generator, which a compiled graph
    can only point at the stream across a graph break. The math path draws
    its mask from the stream inside the graph (`rng_streams.dropout`).
    """
    return (req.dropout_p > 0 and req.rng is not None and req.q_BTNH.device.type == "cpu"
            and torch.compiler.is_compiling())


def _candidates(req: AttentionRequest, flash_attention, backend):
    """`(backend names in the order to try, what the user asked for or None)`."""
    if backend is not None:
        return [backend], f"attention_backend={backend!r}"
    if flash_attention is True:
        return ["flash"], "flash_attention=True"
    if flash_attention is False:
        return ["varlen", "sdpa", "math"], None
    if flash.ranks_after_sdpa(req):
        return ["sdpa", "flash", "math"], None
    if _stream_dropout_on_cpu(req):
        return ["flash", "math", "sdpa"], None
    return list(BACKENDS), None


def select(req: AttentionRequest, flash_attention=None, backend: str | None = None):
    """Chooses a backend for `req`.

    Backends are asked in order and the first that takes the call serves it,
    so a later backend's refusals are never computed (varlen's plan reads
    mask values: it is made only when varlen's turn comes).

    Args:
        req: the attention request.
        flash_attention: Keras's switch: None picks the fastest backend that
            accepts the input, True requires flash-attn, False excludes it.
        backend: a backend name that must be used ("flash", "varlen", "sdpa", "math").

    Returns:
        `(module, explanation)`: the backend module and a one-line account of
        the verdicts of the backends asked.

    Raises:
        ValueError: if the required backend refuses the input (listing every backend's reasons).
    """
    candidates, wanted = _candidates(req, flash_attention, backend)
    reasons: dict[str, list[str]] = {}
    for name in candidates:
        why = BACKENDS[name].refusals(req)
        if name == "varlen" and not why and backend is None:
            gain, skip = varlen.worthwhile(req)
            why = [] if gain else [f"able, but skipped: {skip}"]
        reasons[name] = why
        if not why:
            return BACKENDS[name], _explain(reasons)
    for name, b in BACKENDS.items():  # a refusal lists every backend's reasons
        if name not in reasons:
            reasons[name] = b.refusals(req)
    raise ValueError(
        f"{wanted} cannot serve this call. Why each backend refused: {_explain(reasons)}. "
        "Change the input as the reasons say, or let dist_mha choose (flash_attention=None)."
    )


def attention(req: AttentionRequest, flash_attention=None, backend: str | None = None):
    """Runs `req` on the chosen backend.

    Returns:
        `(out_BTNH, probs_BNTS or None, backend_name, explanation)`.
    """
    module, why = select(req, flash_attention, backend)
    # Logging is untraceable for torch.compile; the choice is also on the layer.
    if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
        logger.debug("dist_mha attention backend %r (%s)", module.NAME, why)
    out, probs = module.run(req)
    return out, probs, module.NAME, why

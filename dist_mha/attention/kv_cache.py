"""Key/value caches for incremental decoding.

Shape legend: B batch, L cached positions, S new positions, k this rank's
key/value heads (K / tp, or 1 replicated head when K < tp), H key_dim,
Hv value_dim.

A cache holds the projected keys and values of every position a layer has
seen, for this tensor-parallel rank's key/value heads only: grouped-query
attention shrinks it by `N / K` against multi-head attention, and tensor
parallelism by `tp` (down to one head per rank). Buffers are allocated once
at `max_length`; a call writes its new positions in place (no re-allocation
per token) and attends over `[0, L + S)`.
"""

from __future__ import annotations

import torch


class KVCache:
    """The keys and values one attention layer has seen, for incremental decoding.

    Make one with `layer.init_cache(batch_size, max_length)` (or
    `DecoderLM.init_cache`) and pass it as `cache=` on every call: each call
    appends the key/value projections of its `key`/`value` inputs, and its
    queries attend to everything cached. With `use_causal_mask=True` query
    `i` of a call sits at position `L + i` (L = positions cached before the
    call), so a prompt followed by one token per call gives exactly the
    logits of one full causal forward.

    Args:
        batch_size: B.
        max_length: the most positions the cache will hold.
        num_heads: this rank's key/value heads.
        key_dim, value_dim: head sizes.
        dtype, device: of the buffers (the layer's compute dtype and device).

    Attributes:
        length: positions cached so far.
    """

    def __init__(self, batch_size: int, max_length: int, num_heads: int, key_dim: int, value_dim: int, *,
                 dtype=torch.float32, device=None):
        for name, v in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"Received an invalid value for argument `{name}`, expected a positive int. "
                                 f"Received: {name}={v!r}")
        self.k_BLkH = torch.zeros(batch_size, max_length, num_heads, key_dim, dtype=dtype, device=device)
        self.v_BLkH = torch.zeros(batch_size, max_length, num_heads, value_dim, dtype=dtype, device=device)
        self.keep_BL: torch.Tensor | None = None  # key padding, once any call passed a value/key mask
        self.length = 0
        self._live = None  # (k, v) with autograd history, while decoding differentiably

    @property
    def max_length(self) -> int:
        return self.k_BLkH.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(t.numel() * t.element_size() for t in (self.k_BLkH, self.v_BLkH))

    def reset(self) -> None:
        """Forgets every cached position (the buffers are reused)."""
        self.length = 0
        self.keep_BL = None
        self._live = None

    def append(self, k_BSkH: torch.Tensor, v_BSkH: torch.Tensor, keep_BS: torch.Tensor | None):
        """Caches `S` new positions; returns `(k_B(L+S)kH, v_B(L+S)kH, keep_B(L+S) or None, L)`.

        Raises:
            ValueError: if the shapes do not match the cache, or it would overflow.
        """
        B, S = k_BSkH.shape[:2]
        L = self.length
        if B != self.k_BLkH.shape[0] or tuple(k_BSkH.shape[2:]) != tuple(self.k_BLkH.shape[2:]) \
                or tuple(v_BSkH.shape[2:]) != tuple(self.v_BLkH.shape[2:]):
            raise ValueError(
                f"Received key/value projections of shapes {tuple(k_BSkH.shape)} / {tuple(v_BSkH.shape)} for a cache "
                f"of (batch, max_length, heads, head_dim) = {tuple(self.k_BLkH.shape)} / {tuple(self.v_BLkH.shape)}. "
                "Make the cache with this layer's init_cache(batch_size, max_length) and the call's batch size."
            )
        if L + S > self.max_length:
            raise ValueError(
                f"The KV cache holds {L} positions and this call adds {S}, more than its max_length="
                f"{self.max_length}. Make a larger cache (init_cache(batch_size, max_length)) or reset() it."
            )
        if torch.is_grad_enabled() and (k_BSkH.requires_grad or v_BSkH.requires_grad):
            # Differentiable decoding: earlier positions keep their autograd history
            # (the buffers hold detached copies), at the cost of a concatenation per call.
            k_prev, v_prev = self._live if self._live is not None else (self.k_BLkH[:, :L], self.v_BLkH[:, :L])
            k_all = torch.cat([k_prev, k_BSkH.to(self.k_BLkH.dtype)], dim=1)
            v_all = torch.cat([v_prev, v_BSkH.to(self.v_BLkH.dtype)], dim=1)
            self._live = (k_all, v_all)
        else:
            self._live = None
            k_all = v_all = None
        with torch.no_grad():
            self.k_BLkH[:, L:L + S] = k_BSkH
            self.v_BLkH[:, L:L + S] = v_BSkH
        if k_all is None:
            k_all, v_all = self.k_BLkH[:, :L + S], self.v_BLkH[:, :L + S]
            if torch.is_grad_enabled():
                # Another input of this call may need gradients (the queries): autograd would save these
                # views of buffers the next call writes in place, so it gets copies.
                k_all, v_all = k_all.clone(), v_all.clone()
        if keep_BS is not None and self.keep_BL is None:
            self.keep_BL = torch.ones(B, self.max_length, dtype=torch.bool, device=self.k_BLkH.device)
        if self.keep_BL is not None:
            self.keep_BL[:, L:L + S] = True if keep_BS is None else keep_BS
        self.length = L + S
        # A copy, never a view: kernels may save the mask for backward, and the next call writes the buffer.
        keep = None if self.keep_BL is None else self.keep_BL[:, :L + S].clone()
        return k_all, v_all, keep, L

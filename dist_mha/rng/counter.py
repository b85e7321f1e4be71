"""Counter-based (stateless) random numbers keyed by global element index.

A tensor-parallel rank must be able to build exactly its own shard of a large
weight, and the shard must not depend on how the weight is split. A stateful
generator cannot do that without drawing the whole tensor on every rank, so
here every element is a pure function of `(key, flat_index)`: the element at
global multi-index `i` of a tensor of global shape `shape` hashes the
row-major flat index of `i` together with a 64-bit key. Any block can then be
generated on its own and equals the same block cut from the full tensor, bit
for bit, on CPU and CUDA alike.

The hash is the splitmix64 output function applied to `key + (n + 1) * gamma`
(the n-th splitmix64 state), done with int64 torch ops. Torch int64
multiplication and addition wrap modulo 2**64, which is exactly the unsigned
arithmetic splitmix64 needs; `>>` on int64 is arithmetic, so right shifts are
masked to behave as logical shifts.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

__all__ = ["mix64", "uniform", "normal", "keep_mask"]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
# Nonzero start value so that mix64() of nothing, or of zeros, is not zero.
_IV = 0x6A09E667F3BCC909


def _fmix(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def _limbs(x: int) -> list[int]:
    # Values outside [-2**63, 2**64) are folded 64 bits at a time (with the
    # sign as an extra limb) so that large seeds do not silently collide.
    if -(1 << 63) <= x < (1 << 64):
        return [x & _MASK64]
    sign, x = (1, -x) if x < 0 else (0, x)
    out = []
    while x:
        out.append(x & _MASK64)
        x >>= 64
    return out + [sign, len(out)]


def mix64(*ints: int) -> int:
    """Combines Python integers into one 64-bit key.

    Each value, taken modulo 2**64 (values outside `[-2**63, 2**64)` are
    folded 64 bits at a time), is absorbed as `h = fmix64((h + gamma) ^ x)`
    where `fmix64` is the splitmix64 finaliser and `gamma` the golden-ratio
    constant; the number of values is absorbed last so that `mix64(a)` and
    `mix64(a, 0)` differ. The function is pure and platform independent.

    Args:
        *ints: Python integers (bools are accepted as 0/1).

    Returns:
        An int in `[0, 2**64)`.

    Raises:
        TypeError: if an argument is not an integer.

    Example:

    >>> key = mix64(1234, 0)  # seed 1234, stream 0
    >>> 0 <= key < 2**64
    True
    """
    h = _IV
    for x in ints:
        if not isinstance(x, int):
            raise TypeError(
                f"mix64() takes Python ints only. Received: {x!r} of type {type(x).__name__}"
            )
        for limb in _limbs(int(x)):
            h = _fmix(((h + _GAMMA) & _MASK64) ^ limb)
    return _fmix(((h + _GAMMA) & _MASK64) ^ len(ints))


def _signed(x: int) -> int:
    # torch.int64 holds the same bit pattern as the unsigned Python value.
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    # Arithmetic shift, then clear the sign-extended top `s` bits.
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def _block(shape: Sequence[int], index) -> tuple[list[tuple[int, int, bool]], tuple[int, ...]]:
    """Resolves `index` into per-dim (start, stop, keep_dim) and the out shape."""
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"`shape` must not have negative dims. Received: shape={shape}")
    if index is None:
        index = ()
    elif not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise ValueError(
            f"`index` has more entries ({len(index)}) than `shape` has dims "
            f"({len(shape)}). Received: index={index}, shape={shape}"
        )
    dims, out_shape = [], []
    for d, n in enumerate(shape):
        sel = index[d] if d < len(index) else slice(None)
        if isinstance(sel, slice):
            start, stop, step = sel.indices(n)
            if step != 1:
                raise ValueError(
                    f"`index` slices must have step 1. Received: index[{d}]={sel}"
                )
            stop = max(start, stop)
            dims.append((start, stop, True))
            out_shape.append(stop - start)
        elif isinstance(sel, int) and not isinstance(sel, bool):
            i = sel + n if sel < 0 else sel
            if not 0 <= i < n:
                raise IndexError(f"index {sel} is out of range for dim {d} of size {n}")
            dims.append((i, i + 1, False))
        else:
            raise TypeError(
                f"`index` entries must be slices or ints. Received: index[{d}]={sel!r}"
            )
    return dims, tuple(out_shape)


def _flat_index(shape, index, device) -> tuple[torch.Tensor, tuple[int, ...]]:
    dims, out_shape = _block(shape, index)
    flat = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    # Built from the last dim backwards so each dim's stride is the product
    # of the dims after it (row-major), independent of the block.
    parts = []
    for (start, stop, _), n in zip(reversed(dims), reversed(tuple(shape))):
        parts.append(torch.arange(start, stop, dtype=torch.int64, device=device) * stride)
        stride *= int(n)
    parts.reverse()
    ndim = len(dims)
    for d, part in enumerate(parts):
        view = [1] * ndim
        view[d] = part.numel()
        flat = flat + part.view(view)
    flat = flat.expand(tuple(stop - start for start, stop, _ in dims))
    return flat.reshape(out_shape), out_shape


def _bits(key: int, flat: torch.Tensor) -> torch.Tensor:
    """splitmix64 output at positions `flat` of the stream seeded by `key`."""
    # In-place ops: these tensors can be large and allocation dominates.
    z = flat + 1
    z.mul_(_signed(_GAMMA)).add_(_signed(key))
    for shift, mul in ((30, _MUL1), (27, _MUL2)):
        z.bitwise_xor_(_srl(z, shift)).mul_(_signed(mul))
    return z.bitwise_xor_(_srl(z, 31))


def _to_unit(bits: torch.Tensor) -> torch.Tensor:
    m = _srl(bits, 11)  # top 53 bits: exactly representable in a double
    u = m.to(torch.float64).mul_(2.0**-53)
    # u is in [0, 1 - 2**-53]; the single zero cell (probability 2**-53) is
    # moved to its midpoint so log(u) and inverse CDFs stay finite.
    return u.masked_fill_(m == 0, 2.0**-54)


def uniform(key: int, shape: Sequence[int], index=None, *, device=None) -> torch.Tensor:
    """Draws float64 uniforms in the open interval (0, 1), blockwise.

    The element at global multi-index `i` is a function of `key` and the
    row-major flat index of `i` in `shape` only, so any block equals the same
    block of the full tensor bit for bit. Each value carries 53 random bits
    (`m * 2**-53`, with `m = 0` mapped to `2**-54`).

    Args:
        key: 64-bit integer key, typically from `mix64`.
        shape: global shape of the (virtual) full tensor.
        index: optional tuple of step-1 slices (ints also allowed, dropping
            that dim), one per leading dim, selecting a block of the global
            tensor; missing trailing dims are taken whole.
        device: torch device for the result (CPU by default).

    Returns:
        A float64 tensor equal to `uniform(key, shape)[index]`.

    Raises:
        ValueError: if a slice has a step other than 1 or `index` is too long.
        TypeError: if an `index` entry is not a slice or an int.

    Example:

    >>> full = uniform(mix64(0), (4, 6))
    >>> part = uniform(mix64(0), (4, 6), (slice(1, 3), slice(2, 6)))
    >>> bool(torch.equal(full[1:3, 2:6], part))
    True
    """
    flat, _ = _flat_index(shape, index, device)
    return _to_unit(_bits(int(key) & _MASK64, flat))


def normal(key: int, shape: Sequence[int], index=None, *, device=None) -> torch.Tensor:
    """Draws float64 standard normals, blockwise (see `uniform`).

    Box-Muller on two uniforms drawn with keys derived from `key`, keeping
    only the cosine branch so that every element depends on its own index
    alone.

    Args:
        key: 64-bit integer key.
        shape: global shape of the (virtual) full tensor.
        index: optional block selection, as in `uniform`.
        device: torch device for the result.

    Returns:
        A float64 tensor equal to `normal(key, shape)[index]`.

    Raises:
        ValueError: as `uniform`.
        TypeError: as `uniform`.

    Example:

    >>> z = normal(mix64(7), (1000,))
    >>> abs(float(z.mean())) < 0.2
    True
    """
    flat, _ = _flat_index(shape, index, device)
    key = int(key) & _MASK64
    u1 = _to_unit(_bits(mix64(key, 1), flat))
    u2 = _to_unit(_bits(mix64(key, 2), flat))
    radius = u1.log_().mul_(-2.0).sqrt_()
    return radius.mul_(u2.mul_(2.0 * math.pi).cos_())


def keep_mask(key: int, shape: Sequence[int], index, rate: float, *, device=None,
              chunk_elems: int = 1 << 22) -> torch.Tensor:
    """`uniform(key, shape, index) >= rate` as a bool tensor, bit for bit, at 1 byte per element.

    `uniform` holds about 32 bytes of int64/float64 temporaries per element;
    here they exist for `chunk_elems` elements at a time (blocks are exact,
    see `uniform`), and the comparison is done on the 53-bit integers, so no
    float64 tensor is made.

    Args:
        key, shape, index: as in `uniform`.
        rate: drop probability in [0, 1).
        device: torch device of the result.
        chunk_elems: most elements computed at once.

    Returns:
        A bool tensor shaped like `uniform(key, shape, index)`.
    """
    dims, out_shape = _block(shape, index)
    sizes = [stop - start for start, stop, _ in dims]
    out = torch.empty(sizes, dtype=torch.bool, device=device)  # every dim kept; viewed as out_shape at the end
    # u = m * 2**-53 (m >= 1) or 2**-54 (m == 0): u >= rate iff m >= ceil(rate * 2**53), for rate > 2**-54.
    threshold = None if rate <= 2.0**-54 else math.ceil(rate * 2.0**53)
    key = int(key) & _MASK64
    # Dims k.. are taken whole; dim k - 1 in steps; dims before it one index at a time.
    k, inner = len(sizes), 1
    while k > 0 and inner * sizes[k - 1] <= chunk_elems:
        k -= 1
        inner *= sizes[k]
    step = max(1, chunk_elems // inner)
    outer_ranges = [range(n) for n in sizes[: max(k - 1, 0)]]
    split = range(0, sizes[k - 1], step) if k > 0 else [0]
    for outer in itertools.product(*outer_ranges):
        for j in split:
            local = [slice(i, i + 1) for i in outer]
            if k > 0:
                local.append(slice(j, min(j + step, sizes[k - 1])))
            local += [slice(None)] * (len(sizes) - len(local))
            sub = tuple(slice(start + sl.indices(n)[0], start + sl.indices(n)[1])
                        for (start, _, _), sl, n in zip(dims, local, sizes))
            flat, _ = _flat_index(shape, sub, device)
            view = out[tuple(local)]
            if threshold is None:
                view.fill_(True)
            else:
                torch.ge(_srl(_bits(key, flat), 11), threshold, out=view)
    return out.view(out_shape)

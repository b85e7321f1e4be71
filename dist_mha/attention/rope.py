"""Rotary position embeddings: Hugging Face's `rope_parameters`, checked, and the frequencies they define.

Shape legend: R = rotated features of a head (`int(key_dim * partial_rotary_factor)`,
even), F = R / 2 frequencies.

`Rope.from_dict` takes the keys of a Hugging Face `rope_parameters` dict with
their meaning and defaults (transformers 5: `modeling_rope_utils.py`), plus our
`interleaved` flag, and raises a ValueError naming any unknown key or bad
value (Hugging Face only warns). `inverse_frequencies(max_position)` is
`inv_freq (F,)` in float64 and `attention_scaling` multiplies cos and sin
(YaRN, LongRoPE). The types:

| rope_type | inv_freq | depends on the call |
|---|---|---|
| default | `1 / theta^(2i/R)` | no |
| linear | default / `factor` | no |
| llama3 | default, long wavelengths / `factor`, a smooth band between | no |
| yarn | default and default / `factor` blended by a ramp over the correction range | no |
| longrope | `1 / (ext_i theta^(2i/R))`, `ext` = `long_factor` once the longest position >= `original_max_position_embeddings`, else `short_factor` | the longest position |
| dynamic | default with `theta * (factor L / m - (factor - 1))^(R/(R-2))`, L = max(longest position + 1, m) | the longest position |
| proportional | `1 / theta^(2i/H)` for the rotated pairs, zero (no rotation) for the rest, / `factor` | no |

"dynamic" here is a function of the call's positions; Hugging Face keeps the
largest length seen so far (stateful), so both agree on a model's calls of
non-decreasing length. It cannot be exact with a KV cache (cached keys were
rotated with another base), so the layer refuses that combination.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "interleaved", "max_position_embeddings"}
_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"},
    "longrope": {"factor", "original_max_position_embeddings", "short_factor", "long_factor", "attention_factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "proportional": {"factor"},
}
_REQUIRED = {"linear": {"factor"}, "dynamic": {"factor"}, "yarn": {"factor"},
             "longrope": {"short_factor", "long_factor"},
             "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


def _bad(key, value, expected, fix=""):
    return ValueError(f"Received an invalid value for `rope[{key!r}]`, expected {expected}. Received: "
                      f"rope[{key!r}]={value!r}" + (f". {fix}" if fix else ""))


def _number(params, key, *, low=None, positive=False, default=None):
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(key, value, "a finite number")
    if positive and value <= 0:
        raise _bad(key, value, "a positive number")
    if low is not None and value < low:
        raise _bad(key, value, f"a number >= {low}")
    return float(value)


@dataclass(frozen=True)
class Rope:
    """A checked rotary configuration for heads of `head_dim` features (see the module docstring)."""

    rope_type: str
    theta: float
    head_dim: int
    rotary_dim: int
    interleaved: bool = False
    params: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, rope, head_dim: int) -> Rope:
        """Checks a `rope=` argument (Hugging Face `rope_parameters` keys) for heads of `head_dim` features.

        Raises:
            ValueError: naming an unknown key, a missing required key or a bad value.
        """
        if not isinstance(rope, dict):
            raise ValueError("Received an invalid value for argument `rope`, expected None or a dict of Hugging Face "
                             f"`rope_parameters` keys such as {{'rope_type': 'default', 'rope_theta': 10000.0}}. "
                             f"Received: rope={rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise _bad("rope_type", kind, f"one of {ROPE_TYPES}")
        unknown = sorted(set(rope) - _COMMON - _KEYS[kind])
        if unknown:
            raise ValueError(f"Received unknown keys {unknown} in `rope` for rope_type={kind!r}; it takes "
                             f"{sorted(_COMMON | _KEYS[kind])}.")
        missing = sorted(k for k in _REQUIRED.get(kind, ()) if rope.get(k) is None)
        if missing:
            raise ValueError(f"`rope` with rope_type={kind!r} needs {missing}. Received: rope={rope!r}")
        theta = _number(rope, "rope_theta", positive=True, default=10000.0)
        fraction = _number(rope, "partial_rotary_factor", default=1.0)
        if not 0 < fraction <= 1:
            raise _bad("partial_rotary_factor", rope["partial_rotary_factor"], "a number in (0, 1]")
        rotary_dim = int(head_dim * fraction)
        if rotary_dim < 2 or rotary_dim % 2:
            raise _bad("partial_rotary_factor", fraction, f"a fraction leaving an even number (>= 2) of the "
                       f"{head_dim} features of a head to rotate (got {rotary_dim})")
        interleaved = rope.get("interleaved", False)
        if not isinstance(interleaved, bool):
            raise _bad("interleaved", interleaved, "True (GPT-J pairs) or False (Hugging Face's rotate_half halves)")
        for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
                    "mscale", "mscale_all_dim"):
            _number(rope, key, positive=key not in ("mscale", "mscale_all_dim"))
        for key in ("original_max_position_embeddings", "max_position_embeddings"):
            v = rope.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise _bad(key, v, "a positive int")
        if "truncate" in rope and not isinstance(rope["truncate"], bool):
            raise _bad("truncate", rope["truncate"], "a bool")
        if kind == "longrope":
            for key in ("short_factor", "long_factor"):
                v = rope[key]
                if not isinstance(v, (list, tuple)) or len(v) != rotary_dim // 2 or not all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v):
                    raise _bad(key, v, f"a list of {rotary_dim // 2} positive numbers (one per rotated pair)")
        if kind in ("dynamic", "longrope", "yarn") and _original(rope) is None:
            raise ValueError(f"`rope` with rope_type={kind!r} needs 'original_max_position_embeddings' (or "
                             "'max_position_embeddings', as Hugging Face takes it from the model config).")
        if kind == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
            raise _bad("high_freq_factor", rope["high_freq_factor"], f"more than low_freq_factor={rope['low_freq_factor']}")
        return cls(kind, theta, head_dim, rotary_dim, interleaved, dict(rope))

    def __post_init__(self):
        object.__setattr__(self, "_tables", {})  # (longest, device, dtype) -> inv_freq: made once, read every call
        object.__setattr__(self, "_angles", {})  # rotary.range_angles: (cos, sin) of positions 0..size-1

    def frequencies(self, longest, device, dtype) -> torch.Tensor:
        """`inverse_frequencies(longest)` on `device` in `dtype`, cached (a few per layer)."""
        key = (longest if self.depends_on_length else None, str(device), dtype)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= 16:
                self._tables.clear()
            table = self._tables[key] = self.inverse_frequencies(key[0]).to(device=device, dtype=dtype)
        return table

    @property
    def depends_on_length(self) -> bool:
        """Whether the frequencies depend on the longest position of a call."""
        return self.rope_type in ("dynamic", "longrope")

    def config(self) -> dict:
        """The dict given (for `get_config`)."""
        return dict(self.params)

    def attention_scaling(self) -> float:
        """The factor on cos and sin (so on the logits, squared)."""
        p, factor = self.params, self.params.get("factor")
        if self.rope_type == "yarn":
            if p.get("attention_factor") is not None:
                return float(p["attention_factor"])
            if p.get("mscale") and p.get("mscale_all_dim"):
                return _mscale(factor, p["mscale"]) / _mscale(factor, p["mscale_all_dim"])
            return _mscale(factor)
        if self.rope_type == "longrope":
            if p.get("attention_factor") is not None:
                return float(p["attention_factor"])
            factor = factor or (p.get("max_position_embeddings") or _original(p)) / _original(p)
            return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(_original(p)))
        return 1.0

    def inverse_frequencies(self, longest: int | None = None) -> torch.Tensor:
        """`inv_freq (F,)` in float64; `longest`: the call's largest position + 1 (dynamic, longrope)."""
        p, R = self.params, self.rotary_dim
        exponents = torch.arange(0, R, 2, dtype=torch.float64) / R
        base = self.theta
        if self.rope_type == "dynamic":
            m = p.get("max_position_embeddings") or p["original_max_position_embeddings"]  # Hugging Face's choice
            length = max(longest or m, m)
            base = base * ((p["factor"] * length / m) - (p["factor"] - 1)) ** (R / (R - 2))
        inv = 1.0 / base ** exponents
        if self.rope_type == "linear":
            return inv / p["factor"]
        if self.rope_type == "llama3":
            return _llama3(inv, p)
        if self.rope_type == "yarn":
            return _yarn(inv, p, R, base)
        if self.rope_type == "longrope":
            long = longest is not None and longest > _original(p)
            ext = torch.tensor(p["long_factor"] if long else p["short_factor"], dtype=torch.float64)
            return inv / ext
        if self.rope_type == "proportional":
            pairs = R // 2
            inv = 1.0 / self.theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / self.head_dim)
            return inv / (p.get("factor") or 1.0)
        return inv


def _original(p) -> int | None:
    return p.get("original_max_position_embeddings") or p.get("max_position_embeddings")


def _mscale(scale, m=1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _llama3(inv, p):
    factor, low, high, original = p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelength > original / low, inv / factor, inv)
    middle = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(middle, blended, out)


def _yarn(inv, p, R, base):
    factor, original = p["factor"], _original(p)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return R * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, R - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(R // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return inv / factor * ramp + inv * (1 - ramp)

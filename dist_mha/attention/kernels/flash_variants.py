"""The flash-attn builds dist_mha can call, found by their functions.

| variant | import | dropout | GPUs | head size |
|---|---|---|---|---|
| FA3 | `flash_attn_interface` (flash-attn's `hopper/` build) | no | Hopper (sm90) | multiple of 8, <= 256 |
| FA4 | `flash_attn.cute` (the `flash-attn-4` wheel) | no | Hopper, Blackwell (sm90, sm100) | multiple of 8, <= 256 (sm90) / <= 128 (sm100) |
| FA2 | `flash_attn` (flash-attn 2.x) | yes | sm80 and newer | <= 256 |

Each build is looked up by the two functions dist_mha calls, never by its
package name: the `flash-attn-4` wheel installs only `flash_attn.cute`,
after which `import flash_attn` succeeds as an empty namespace package.
A build that is installed but unusable (no such function, a failing
extension) is reported with its reason; only a build whose module does not
exist at all counts as "not installed".

Arguments are bound by keyword against each function's own signature, read
once here: FA3 builds of the v2.7.4 era take `seqused_q, seqused_k` (with no
default) before `max_seqlen_q, max_seqlen_k`; early FA3 builds have no
`window_size`; early FA4 builds have no `max_seqlen_*`.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

# (name, module, pip hint); the order is the order of preference.
SPECS = (
    ("FA3", "flash_attn_interface", "flash-attn's hopper/ build"),
    ("FA4", "flash_attn.cute", "pip install flash-attn-4"),
    ("FA2", "flash_attn", "pip install flash-attn"),
)
_FUNCTIONS = ("flash_attn_func", "flash_attn_varlen_func")
# Required parameters dist_mha does not use: passed as None.
_UNUSED_REQUIRED = {"seqused_q", "seqused_k"}


@dataclass
class Variant:
    """One importable flash-attn build and the parameters its functions take."""

    name: str
    module: str
    dense: object
    varlen: object
    dense_params: frozenset = field(default_factory=frozenset)
    varlen_params: frozenset = field(default_factory=frozenset)
    varlen_unused: tuple = ()

    @property
    def dropout(self) -> bool:
        return "dropout_p" in self.dense_params

    @property
    def window(self) -> bool:
        return "window_size" in self.dense_params and "window_size" in self.varlen_params

    def takes(self, name: str) -> bool:
        """Whether both functions of this build take the keyword `name` (`softcap`, `learnable_sink`)."""
        return name in self.dense_params and name in self.varlen_params

    def call_dense(self, q, k, v, **kwargs):
        out = self.dense(q, k, v, **_only(kwargs, self.dense_params))
        return out[0] if isinstance(out, tuple) else out  # FA3/FA4 may also return the logsumexp

    def call_varlen(self, q, k, v, **kwargs):
        kwargs = dict(_only(kwargs, self.varlen_params), **{name: None for name in self.varlen_unused})
        out = self.varlen(q, k, v, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _only(kwargs: dict, accepted: frozenset) -> dict:
    return {k: v for k, v in kwargs.items() if k in accepted}


def _params(fn):
    """(accepted keyword names, required names after q/k/v); None when unreadable."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None  # a **kwargs wrapper: nothing to check against
    names = frozenset(p.name for p in params[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    required = tuple(p.name for p in params[3:] if p.default is p.empty and p.kind is not p.VAR_POSITIONAL)
    return names, required


# FA2's keywords (assumed for an unreadable signature). Each call passes only those its function
# accepts, `softcap` and `learnable_sink` included where a build takes them.
_DENSE = frozenset({"dropout_p", "softmax_scale", "causal", "window_size"})
_VARLEN = _DENSE | {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"}


def _variant(name: str, module: str, dense, varlen) -> tuple[Variant | None, str | None]:
    # An unreadable signature (a C++ or **kwargs wrapper): assume FA2's keywords.
    dense_p = _params(dense) or (_DENSE, ())
    varlen_p = _params(varlen) or (_VARLEN, ())
    unknown = sorted({n for n in dense_p[1] if n not in _DENSE}
                     | {n for n in varlen_p[1] if n not in _VARLEN and n not in _UNUSED_REQUIRED})
    if unknown:
        return None, (f"{module} ({name}) is installed but its functions require arguments dist_mha does not "
                      f"pass ({', '.join(unknown)}): an unsupported flash-attn version")
    missing = sorted({"cu_seqlens_q", "cu_seqlens_k"} - varlen_p[0])
    if missing:
        return None, (f"{module}.flash_attn_varlen_func ({name}) takes no {', '.join(missing)}: "
                      "an unsupported flash-attn version")
    unused = tuple(n for n in varlen_p[1] if n in _UNUSED_REQUIRED)
    return Variant(name, module, dense, varlen, dense_p[0], varlen_p[0], unused), None


def load() -> tuple[list[Variant], list[str], list[str]]:
    """Imports every flash-attn build present.

    Returns:
        `(variants, absent, unusable)`: the usable builds in order of
        preference; the modules that are not installed; one sentence per
        build that is installed but cannot be used, saying why.
    """
    variants, absent, unusable = [], [], []
    for name, module, _ in SPECS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            # Only the module itself (or its parent package) missing means "not installed";
            # a missing dependency inside it is a broken install.
            parents = {module[: i] for i in range(len(module) + 1) if module[i:i + 1] in (".", "")}
            if err.name in parents:
                absent.append(module)
            else:
                unusable.append(f"{module} ({name}) failed to import: {type(err).__name__}: {err}")
            continue
        except Exception as err:  # a broken extension raises ImportError, OSError or RuntimeError
            unusable.append(f"{module} ({name}) failed to import: {type(err).__name__}: {err}")
            continue
        fns = [getattr(mod, f, None) for f in _FUNCTIONS]
        if not all(callable(f) for f in fns):
            lacking = [f for f, fn in zip(_FUNCTIONS, fns) if not callable(fn)]
            hint = (" (the flash-attn-4 wheel installs only flash_attn.cute, which makes `flash_attn` an empty "
                    "namespace package; install flash-attn 2.x for FA2)") if module == "flash_attn" else ""
            unusable.append(f"{module} is importable but has no {' or '.join(lacking)}{hint}")
            continue
        variant, why = _variant(name, module, *fns)
        if variant is None:
            unusable.append(why)
        else:
            variants.append(variant)
    return variants, absent, unusable

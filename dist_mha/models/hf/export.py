"""`to_hf`: a `CausalLM` back to a checkpoint that `transformers` loads.

Every rank calls it: each weight is gathered over the TP group (one
collective per tensor, in a fixed order; DTensor parameters of a mesh model,
FSDP-sharded or not, are gathered with `full_tensor()`), and global rank 0 writes
`config.json` and `model.safetensors`, each atomically (a temporary file,
fsynced and renamed), so a reader never sees half a checkpoint. The other
ranks wait at a barrier until the files are in place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist

from dist_mha.checkpoint.atomic_io import atomic_write
from dist_mha.models.hf import config as hf_config
from dist_mha.models.hf import weights

_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod)\.")
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def hf_state_dict(model) -> dict:
    """The model's weights under their Hugging Face names, full (gathered over TP, and DP under FSDP): a collective."""
    from torch.distributed.tensor import DTensor

    cfg, group = model.config, model.tp_group
    # FSDP2 and activation checkpointing keep the parameter names; wrappers would prefix them.
    params = {_WRAPPERS.sub("", n): p for n, p in model.named_parameters()}
    out = {}
    with torch.no_grad():
        for rule in weights.rules(cfg):
            p = params[rule.ours].detach()
            # A DTensor holds its global shape: full_tensor() is the whole parameter (each replicated
            # key/value head once), the same tensor the process-group gather below gives.
            full = p.full_tensor() if isinstance(p, DTensor) else weights.full_ours(rule, p, group)
            out[rule.hf] = weights.to_hf_layout(rule, full).cpu()
    return out


def to_hf(model, out_dir) -> Path:
    """Writes `model` as a Hugging Face checkpoint; every rank calls it.

    Args:
        model: a `CausalLM` made by `from_hf` (its `hf_config` is the source's
            config; the architecture fields are checked against the model).
        out_dir: directory for `config.json` and `model.safetensors` (created).

    Returns:
        `out_dir` as a Path, once the files are complete (on every rank).

    Raises:
        ValueError: for a model without `hf_config` (not made by `from_hf`), or
            whose config does not describe it.

    Example:

    >>> to_hf(model, "exported")            # on every rank
    >>> AutoModelForCausalLM.from_pretrained("exported")
    """
    raw = getattr(model, "hf_config", None)
    if raw is None:
        raise ValueError("Received a model without `hf_config`; to_hf exports models made by "
                         "dist_mha.models.from_hf (or given a Hugging Face config dict as `model.hf_config`).")
    if hf_config.parse(raw) != model.config:
        raise ValueError("Received a model whose `hf_config` does not describe it (the parsed config differs from "
                         "model.config); set model.hf_config to the config of the checkpoint it was loaded from.")
    tensors = hf_state_dict(model)  # every rank takes part in the gathers
    out = Path(out_dir)
    if _is_rank0():
        from safetensors.torch import save

        out.mkdir(parents=True, exist_ok=True)
        dtype = model.embed.weight.dtype
        cfg = dict(raw, dtype=_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", "")))
        cfg.pop("torch_dtype", None)
        cfg["architectures"] = cfg.get("architectures") or [hf_config.ARCHITECTURES[raw["model_type"]]]
        blob = save(tensors, metadata={"format": "pt"})
        atomic_write(out / "model.safetensors", lambda f: f.write(blob))
        atomic_write(out / "config.json", lambda f: f.write((json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()))
    if dist.is_initialized():
        dist.barrier()
    return out

"""`from_hf`: a Hugging Face checkpoint into a tensor/context-parallel `CausalLM`, each rank reading its slices.

A checkpoint directory holds `config.json` and `model.safetensors`, or several
`*.safetensors` files with `model.safetensors.index.json` naming the file of
each tensor. Every rank builds only its shards of the model and fills each
from `safe_open(file).get_slice(name)[its rows or columns]`, so no rank ever
holds a whole weight it does not keep (the largest transient is one slice;
`bench/bench_hf_load.py` measures the peak).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from dist_mha.models.causal_lm import CausalLM
from dist_mha.models.hf import config as hf_config
from dist_mha.models.hf import weights
from dist_mha.parallel import mesh
from dist_mha.parallel.groups import size_of
from dist_mha.parallel.tp.sharding import valid_tp_sizes

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class _Directory:
    """Tensors of a checkpoint directory, read slice by slice.

    Each read opens its file and closes it again: safetensors maps the file,
    and the pages a slice touched stay resident (and counted) while the map
    is open, so a long-lived handle would end up holding every page read.
    """

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
            return
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"Received src={str(path)!r}, which holds no *.safetensors file (and no "
                             "model.safetensors.index.json); expected a checkpoint written by save_pretrained "
                             "or to_hf. Point src at the directory that holds the weights.")
        self.where = {}
        for f in files:
            with self._open(f.name) as st:
                self.where.update({name: f.name for name in st.keys()})

    def _open(self, file: str):
        from safetensors import safe_open

        full = self.path / file
        if not full.is_file():
            raise ValueError(f"The checkpoint index of {str(self.path)!r} names {file!r}, which is missing; "
                             "copy every file of the checkpoint (or re-save it).")
        return safe_open(str(full), framework="pt", device="cpu")

    def names(self):
        return list(self.where)

    def shape(self, name):
        with self._open(self.where[name]) as st:
            return tuple(st.get_slice(name).get_shape())

    def dtype(self, name):
        with self._open(self.where[name]) as st:
            return _ST_DTYPES.get(st.get_slice(name).get_dtype())

    def read(self, name, index):
        with self._open(self.where[name]) as st:
            return st.get_slice(name)[index]


class _InMemory:
    """Tensors of a `PreTrainedModel`'s state dict (already in memory)."""

    def __init__(self, state: dict):
        self.state = state

    def names(self):
        return list(self.state)

    def shape(self, name):
        return tuple(self.state[name].shape)

    def dtype(self, name):
        return self.state[name].dtype

    def read(self, name, index):
        return self.state[name][index].detach().cpu()


def _source(src):
    """`(config dict, tensor source factory, description)` of a directory or a `transformers` model."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not (path / "config.json").is_file():
            raise ValueError(f"Received src={str(src)!r}, which has no config.json; expected a local Hugging Face "
                             "checkpoint directory (config.json + *.safetensors) or a transformers PreTrainedModel.")
        return json.loads((path / "config.json").read_text()), lambda: _Directory(path), str(path)
    if hasattr(src, "config") and hasattr(src, "state_dict"):
        return src.config.to_dict(), lambda: _InMemory(src.state_dict()), type(src).__name__
    raise ValueError(f"Received src of type {type(src).__name__}; expected a checkpoint directory (str or Path) "
                     "or a transformers PreTrainedModel.")


# Largest read at a time: the slice read and the file pages it touched are the transient of loading.
CHUNK_BYTES = 2 << 20


def _fill(view, source, name: str, index: tuple) -> None:
    """Copies the HF tensor's slice `index` into `view` (our parameter in HF orientation), a few rows at a time."""
    rows = view.shape[0]
    row_bytes = max(1, view[0].numel() * view.element_size()) if view.dim() > 1 else view.element_size()
    step = max(1, CHUNK_BYTES // row_bytes) if view.dim() > 1 else rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        view[r0:r1].copy_(source.read(name, weights.narrow_rows(index, r0, r1)))


def _check_tp(cfg, tp: int, what: str) -> None:
    valid = [t for t in valid_tp_sizes(cfg.num_heads, cfg.num_kv_heads) if cfg.intermediate_size % t == 0]
    if tp not in valid:
        raise ValueError(
            f"Received a tp_group of size {tp} for {what} (num_attention_heads={cfg.num_heads}, "
            f"num_key_value_heads={cfg.num_kv_heads}, intermediate_size={cfg.intermediate_size}): query heads and "
            "MLP features must split evenly over the TP ranks, and key/value heads split or replicate evenly. "
            f"Valid TP sizes: {valid}. Use one of them.")


def _check_names(rules, source, what: str, tied: bool) -> None:
    expected = {r.hf for r in rules}
    have = set(source.names())
    if tied:  # a tied head is the embedding; in-memory models (and some files) list it under both names
        have.discard("lm_head.weight")
    missing = sorted(expected - have)
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} tensor(s) its config implies, e.g. {missing[:3]}; the config "
                         "and the weights do not belong together (or a file of the checkpoint is missing).")
    extra = sorted(n for n in have - expected if not n.endswith(weights.IGNORED_SUFFIXES))
    if extra:
        raise ValueError(f"{what} holds {len(extra)} tensor(s) this architecture has no place for, e.g. {extra[:3]}; "
                         "they would be dropped silently. The checkpoint is not a plain "
                         "model of its model_type (adapters or extra heads are not supported).")


def from_hf(src, *, tp_group=None, cp_group=None, cp_mode="ring", sequence_parallel=False, dtype=None, device=None):
    """A Hugging Face causal LM (Llama, Mistral, Qwen2, Qwen3, Gemma2) as a parallel `CausalLM`.

    Args:
        src: a local checkpoint directory (`config.json` plus `*.safetensors`,
            sharded with an index or not), or a `transformers` `PreTrainedModel`.
        tp_group: tensor parallelism: this rank reads and keeps its heads, MLP
            features and vocabulary rows only. A process group, or a 1-D
            DeviceMesh (`state.mesh["tp"]`): then every parameter is a DTensor
            (for FSDP2, DCP and `clip_grad_norm_`), filled from the same slices.
        cp_group, cp_mode: context parallelism ("ring" or "ulysses"); a mesh
            axis (`state.mesh["cp"]`) when `tp_group` is one.
        sequence_parallel: sequence parallelism inside the TP group.
        dtype: of the parameters; None keeps the checkpoint's.
        device: of the parameters.

    Returns:
        A `CausalLM` in eval mode whose `forward(tokens, *, segment_ids=None,
        position_ids=None, cache=None)` gives the logits `(B, T, V)` (this
        rank's part of the sequence under CP). `model.hf_config` keeps the
        source's config for `to_hf`.

    Raises:
        ValueError: for an unsupported model_type or config field (named), a
            TP size that does not split the heads (valid sizes listed), a mesh
            axis mixed with a process group or not 1-D, missing
            or unexpected tensors, a missing safetensors file, or tensors whose
            shapes disagree with the config.

    Example:

    >>> model = from_hf("path/to/llama", tp_group=state.tp_group)
    >>> logits = model(tokens)                  # (B, T, V), equal to transformers' logits
    """
    raw, open_source, what = _source(src)
    cfg = hf_config.parse(raw)  # the config's errors first: they say the most
    tp_arg, cp_arg = tp_group, cp_group  # the model takes them as given (meshes make DTensor parameters)
    tp_group, tp_mesh, _, cp_mesh = mesh.axes(tp_arg, cp_arg)  # before any collective, like the other checks
    on_mesh = tp_mesh is not None or cp_mesh is not None
    _check_tp(cfg, size_of(tp_group), what)
    rules = weights.rules(cfg)
    source = open_source()
    _check_names(rules, source, what, cfg.tie_embeddings)
    if dtype is None:
        dtype = source.dtype(rules[0].hf)
    build = dict(tp_group=tp_arg, sequence_parallel=sequence_parallel, cp_group=cp_arg, cp_mode=cp_mode,
                 dtype=dtype, initialize=False)
    if on_mesh:
        # DTensors are made at build (replicated key/value heads gathered then), so the model is built on
        # its device, zero-filled (the storage it keeps: no larger transient), and filled through its
        # local views; `write=True` re-gathers replicated key/value heads over TP afterwards.
        from dist_mha.parallel.dtensor import local_params

        model = CausalLM(cfg, device=device or "cpu", **build)
        local = local_params(model, write=True)
    else:
        # Built without memory (meta), then given uninitialised storage: every parameter is read below, so
        # random initial weights would only cost time and a transient several times a shard's size.
        model = CausalLM(cfg, device="meta", **build)
        model.to_empty(device=device or "cpu")
        local = contextlib.nullcontext()
    with torch.no_grad(), local:
        # Plain tensors either way: this rank's shards, in the layout of the process-group model.
        params = dict(model.named_parameters())
        unfilled = sorted(set(params) - {r.ours for r in rules})
        if unfilled:
            raise RuntimeError(f"No checkpoint tensor fills {unfilled}: the weight table is incomplete (a bug).")
        for rule in rules:
            p = params[rule.ours]
            want = weights.global_shape(rule, p.shape, cfg.head_dim, tp_group)
            got = source.shape(rule.hf)
            if tuple(got) != tuple(want):
                raise ValueError(f"Tensor {rule.hf!r} of {what} has shape {tuple(got)}, but its config implies "
                                 f"{tuple(want)}; the config and the weights do not belong together.")
            _fill(weights.hf_view(rule, p), source, rule.hf,
                  weights.local_index(rule, p.shape, cfg.head_dim, tp_group))
    model.hf_config = {k: v for k, v in raw.items() if k != "_name_or_path"}
    return model.eval()

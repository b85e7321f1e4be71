"""The Keras layer surface of `MultiHeadAttention` that is not the forward pass.

Weights in Keras order and layout, configs, output shapes, regularisation
losses and constraints. Mixed into both Keras layers (`MultiHeadAttention`,
`GroupQueryAttention`) over the engine's projections.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from dist_mha.engine import config as cfg
from dist_mha.keras_objects import constraints, initializers, regularizers
from dist_mha.parallel import region
from dist_mha.parallel.tp import placement, reshard, sharding

_ORDER = ("query", "key", "gate", "value", "attention_output")

# Constructor arguments both Keras layers take with the same meaning (their head arguments differ).
SHARED_ARGS = (
    "dropout", "use_bias", "sliding_window", "flash_attention", "kernel_initializer", "bias_initializer",
    "kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint", "bias_constraint",
    "use_gate", "seed", "query_shape", "value_shape", "key_shape", "attention_backend", "device", "dtype", "tp_group",
    "sequence_parallel", "cp_group", "cp_mode", "dropout_mode", "check_ranks", "name", "trainable", "kwargs",
    "rope", "qk_norm", "qk_norm_eps", "logit_softcap", "attention_sinks", "scale", "output_bias",
)
# The extras of today's LLMs and their defaults: `get_config` lists one only when it differs, so a default
# layer's config stays one Keras takes.
EXTRAS = {"rope": None, "qk_norm": None, "qk_norm_eps": 1e-6, "logit_softcap": None, "attention_sinks": False,
          "scale": None, "output_bias": None}
_OBJECTS = {"kernel_initializer": initializers, "bias_initializer": initializers, "kernel_regularizer": regularizers,
            "bias_regularizer": regularizers, "activity_regularizer": regularizers, "kernel_constraint": constraints,
            "bias_constraint": constraints}


def shared_args(args: dict) -> dict:
    """The `SHARED_ARGS` from a layer constructor's `locals()`, Keras objects resolved for the engine."""
    out = {k: args[k] for k in SHARED_ARGS}
    for name, module in _OBJECTS.items():
        out[name] = module.get(out[name], name)
    for name in ("kernel_initializer", "bias_initializer"):
        if out[name] is None:
            raise ValueError(f"Received an invalid value for argument `{name}`, expected an initializer. "
                             f"Received: {name}=None")
    return out


class WeightInfo(NamedTuple):
    """One Keras weight: its kind, the local parameter and how it is sharded."""

    kind: str  # "kernel" or "bias"
    param: torch.Tensor
    dim: int | None  # shard dim, None when replicated on every TP rank
    units: int  # heads (or features) the shard dim holds in full
    replicas: int  # ranks holding each unit (> 1: replicated key/value heads)
    global_shape: tuple


class KerasLayerAPI:
    """Keras's `Layer` methods, over the projections the layer registered."""

    # -- weights ------------------------------------------------------------------
    def _keras_weights(self) -> list[WeightInfo]:
        """The weights in Keras's order: per sublayer, kernel then bias."""
        out = []
        if not self.built:
            return out
        for name in _ORDER:
            proj = self._modules.get(name)
            if proj is None:
                continue
            out.append(WeightInfo("kernel", proj.kernel, proj.kernel_shard_dim, proj.shard_units, proj.replicas,
                                  proj.global_kernel_shape))
            if proj.bias is not None:
                out.append(WeightInfo("bias", proj.bias, proj.bias_shard_dim, proj.shard_units, proj.replicas,
                                      proj.global_bias_shape))
        # The extras after Keras's weights: QK-norm scales (replicated), sinks (sharded with the heads).
        for name in ("query_norm", "key_norm"):
            if name in self._modules:
                w = self._modules[name].weight
                out.append(WeightInfo("scale", w, None, 1, 1, tuple(w.shape)))
        if getattr(self, "sinks", None) is not None:
            out.append(WeightInfo("sinks", self.sinks, 0, self._num_heads, 1, (self._num_heads,)))
        return out

    @property
    def weights(self) -> list[torch.Tensor]:
        """The parameters in Keras's order (empty before build)."""
        return [w.param for w in self._keras_weights()]

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value) -> None:
        self._trainable = cfg.boolean("trainable", value)
        for p in self.parameters():
            p.requires_grad_(self._trainable)

    @placement.on_local_params()
    def get_weights(self) -> list[np.ndarray]:
        """Returns the weights as numpy arrays in Keras's order and shapes.

        Query kernel `(Dq, N, H)`, query bias `(N, H)`, key kernel `(Dk, K, H)`,
        key bias `(K, H)`, [gate kernel `(Dq, N, Hv)`, gate bias,] value kernel
        `(Dv, K, Hv)`, value bias `(K, Hv)`, output kernel `(N, Hv, *out)`,
        output bias `(*out)` (K key/value heads: N for `MultiHeadAttention`);
        no biases when `use_bias=False`. bfloat16 weights come back as float32
        (numpy has no bfloat16). Under tensor parallelism the arrays are the
        full, unsharded weights (every rank of the group must call this).
        """
        arrays = []
        for w in self._keras_weights():
            with torch.no_grad():
                t = sharding.gather_full(w.param.detach(), w.dim, self.tp_group, w.replicas)
            if t.dtype == torch.bfloat16:
                t = t.float()
            arrays.append(t.cpu().numpy().copy())
        return arrays

    @placement.on_local_params(write=True)
    def set_weights(self, weights) -> None:
        """Sets the weights from arrays in `get_weights()` order and shapes.

        Under tensor parallelism the arrays are the full weights; each rank
        keeps its own heads.

        Raises:
            ValueError: if the layer is unbuilt, or the count or a shape differs.
        """
        params = self._keras_weights()
        if not self.built:
            raise ValueError(
                f"Layer '{self.name}' has no weights yet: call build(query_shape, value_shape) "
                "(or the layer once, or pass query_shape= to the constructor) before set_weights()."
            )
        if isinstance(weights, (dict, str, bytes)) or not hasattr(weights, "__iter__"):
            raise ValueError(
                f"Received an invalid value for argument `weights` of set_weights() on layer '{self.name}', "
                f"expected a list of {len(params)} arrays in get_weights() order (query kernel, query bias, ...). "
                f"Received: weights of type {type(weights).__name__}"
                + (f" with keys {list(weights)[:8]}" if isinstance(weights, dict) else "")
                + ". Pass `layer.get_weights()`-style lists, or load a state dict with load_state_dict()."
            )
        weights = list(weights)
        if len(weights) != len(params):
            raise ValueError(
                f"You called `set_weights(weights)` on layer '{self.name}' with a weight list of "
                f"length {len(weights)}, but the layer was expecting {len(params)} weights."
            )
        for i, (info, w) in enumerate(zip(params, weights)):
            if not isinstance(w, (np.ndarray, torch.Tensor, list, tuple, float, int)):
                raise ValueError(
                    f"Received an invalid value for weight {i} of set_weights() on layer '{self.name}', expected "
                    f"an array of shape {info.global_shape}. Received: an object of type {type(w).__name__}"
                )
            if tuple(np.shape(w)) != tuple(info.global_shape):
                raise ValueError(
                    f"Layer {self.name} weight shape {tuple(info.global_shape)} is not compatible with "
                    f"provided weight shape {tuple(np.shape(w))} (weight {i}, a {info.kind})."
                )
        with torch.no_grad():
            for info, w in zip(params, weights):
                full = w.detach().cpu() if isinstance(w, torch.Tensor) else torch.as_tensor(np.asarray(w))
                own = sharding.own_slice(full, info.dim, self.tp_group, info.replicas)
                info.param.copy_(own.to(device=info.param.device, dtype=info.param.dtype))

    # -- checkpoints ----------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """Sharding metadata and RNG states, saved in `state_dict()` under `_extra_state`.

        `dist_mha.parallel.tp.reshard.reshard_state_dicts` reads it to load a
        checkpoint written at one TP degree into a layer at another.
        """
        dims, units = {}, {}
        for name in _ORDER:
            proj = self._modules.get(name)
            if proj is not None:
                dims[f"{name}.kernel"] = proj.kernel_shard_dim
                units[f"{name}.kernel"] = proj.shard_units
                if proj.bias is not None:
                    dims[f"{name}.bias"] = proj.bias_shard_dim
                    units[f"{name}.bias"] = proj.shard_units
        if getattr(self, "sinks", None) is not None:
            dims["sinks"], units["sinks"] = 0, self._num_heads  # QK-norm scales are replicated: no entry
        streams = self.rng_streams() if self.built else ()
        return reshard.extra_state(self, dims, self._num_heads, "heads", streams, tensor_units=units)

    def set_extra_state(self, state) -> None:
        rng = reshard.check_extra_state(self, state, self.name)
        by_name = {s.name: s for s in self.rng_streams()}
        for name, st in rng.items():
            if name in by_name:
                by_name[name].load_state_dict(st)

    # -- config ---------------------------------------------------------------------
    def _base_config(self) -> dict:
        """Keras's base-layer keys."""
        return {"name": self.name, "trainable": self._trainable,
                "dtype": cfg.policy_config(self._param_dtype, getattr(self, "_compute_dtype", None))}

    def _extras_config(self) -> dict:
        """The non-default extras (rotary positions, QK-norm, soft-capping, sinks, scale, output bias)."""
        now = {"rope": None if self._rope is None else self._rope.config(), "qk_norm": self._qk_norm,
               "qk_norm_eps": self._qk_norm_eps, "logit_softcap": self._logit_softcap,
               "attention_sinks": self._attention_sinks, "scale": self._scale_arg, "output_bias": self._output_bias}
        return {k: v for k, v in now.items() if v != EXTRAS[k]}

    def _objects_config(self) -> dict:
        """The initializers, regularizers and constraints, serialised as Keras does."""
        return {
            "kernel_initializer": initializers.serialize(self._kernel_initializer),
            "bias_initializer": initializers.serialize(self._bias_initializer),
            "kernel_regularizer": regularizers.serialize(self._kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self._bias_regularizer),
            "activity_regularizer": regularizers.serialize(self._activity_regularizer),
            "kernel_constraint": constraints.serialize(self._kernel_constraint),
            "bias_constraint": constraints.serialize(self._bias_constraint),
        }

    @classmethod
    def from_config(cls, config: dict, **torch_kwargs):
        """Builds a layer from `get_config()` output (ours or Keras's).

        Args:
            config: the config dict.
            **torch_kwargs: torch-only keyword arguments (`device`, `query_shape`, ...).
        """
        return cls(**{**config, **torch_kwargs})

    def compute_output_shape(self, query_shape, value_shape, key_shape=None):
        """Output shape for the given input shapes; works unbuilt, None dims pass through."""
        query_shape, value_shape = cfg.shape_tuple("query_shape", query_shape), cfg.shape_tuple("value_shape", value_shape)
        key_shape = value_shape if key_shape is None else cfg.shape_tuple("key_shape", key_shape)
        if value_shape[1:-1] != key_shape[1:-1]:
            raise ValueError(
                "All dimensions of `value` and `key`, except the last one, must be equal. "
                f"Received: value_shape={value_shape} and key_shape={key_shape}"
            )
        if self._output_shape:
            return query_shape[:-1] + tuple(self._output_shape)
        return query_shape

    # -- regularisation and constraints ------------------------------------------------
    @property
    @placement.on_local_params(grad=True)
    def losses(self) -> list[torch.Tensor]:
        """Differentiable penalties, in Keras's order: the latest call's activity
        penalties (query, key, [gate,] value, output; each divided by batch size),
        then the weight penalties (per weight, Keras order), computed now.

        Under tensor parallelism every penalty is that of the full tensor
        (shards' penalties summed across the group, so every rank of the group
        must read `losses`); its gradient reaches each rank's own shard."""
        out = list(self._activity_losses)
        for w in self._keras_weights():
            reg = {"kernel": self._kernel_regularizer, "bias": self._bias_regularizer}.get(w.kind)
            if reg is not None:
                p = sharding.sync_replicas(self.tp_group, w.replicas, w.param)
                out.append(sharding.penalty(reg, p, w.dim, self.tp_group, w.replicas))
        return out

    @placement.on_local_params(write=True)
    def apply_constraints(self) -> None:
        """Projects every constrained weight in place (what Keras's optimizer does after a step).

        Under tensor parallelism, norms that span shards are reduced across the
        group, so the result equals constraining the full weight."""
        with torch.no_grad():
            for w in self._keras_weights():
                c = {"kernel": self._kernel_constraint, "bias": self._bias_constraint}.get(w.kind)
                if c is not None:
                    w.param.copy_(sharding.constrain(c, w.param, w.dim, self.tp_group, w.replicas))

    def constraint_hook(self, optimizer: torch.optim.Optimizer):
        """Applies the constraints after every `optimizer.step()`; returns the hook handle.

        Example:

        >>> handle = layer.constraint_hook(optimizer)  # handle.remove() to stop
        """
        return optimizer.register_step_post_hook(lambda *_: self.apply_constraints())

    # -- activity regularisation --------------------------------------------------
    # Keras's GroupQueryAttention also sets its own `activity_regularizer`, so
    # Keras's base layer regularises what the layer returns (the output, and
    # the scores when returned) ahead of the sublayers' penalties.
    _regularizes_own_outputs = False

    def _record_activity(self, q, k, gate, v, output, scores=None, scores_head_dim=None) -> None:
        """Keras's activity penalties of one call (see `losses`).

        `scores_head_dim`: the heads dim of `scores` when they are this rank's
        heads only (`local_scores=True` under TP), else None.
        """
        reg = self._activity_regularizer
        if reg is None:
            if self._activity_losses:
                self.__dict__["_activity_losses"] = []
            return
        losses = []
        # Keras regularises each sublayer's output, divided by its batch size.
        # q/k/gate/v hold this rank's heads (k/v heads possibly replicated:
        # counted once); the output is replicated, or sharded on dim 1 under
        # sequence parallelism.
        out_dim = region.SEQ_DIM if self.sequence_parallel else None
        output_penalty = sharding.penalty(reg, output, out_dim, self.tp_group) / output.shape[0]
        if self._regularizes_own_outputs:
            losses.append(output_penalty)
            if scores is not None:
                losses.append(sharding.penalty(reg, scores, scores_head_dim, self.tp_group) / scores.shape[0])
        head_dim = q.dim() - 2
        kv_replicas = self._modules["key"].replicas
        for y, replicas in ((q, 1), (k, kv_replicas), (gate, 1), (v, kv_replicas)):
            if y is not None:
                losses.append(sharding.penalty(reg, y, head_dim, self.tp_group, replicas) / y.shape[0])
        losses.append(output_penalty)
        self.__dict__["_activity_losses"] = losses

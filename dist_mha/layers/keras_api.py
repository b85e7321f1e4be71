"""The Keras layer surface of `MultiHeadAttention` that is not the forward pass.

Weights in Keras order and layout, configs, output shapes, regularisation
losses and constraints. Mixed into `dist_mha.layers.multi_head_attention.MultiHeadAttention`.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_mha.keras_objects import constraints, initializers, regularizers
from dist_mha.layers import config as cfg
from dist_mha.parallel import checkpoint as tp_checkpoint
from dist_mha.parallel import region, sharding

_ORDER = ("query", "key", "gate", "value", "attention_output")


class KerasLayerAPI:
    """Keras's `Layer` methods, over the projections the layer registered."""

    # -- weights ------------------------------------------------------------------
    def _keras_weights(self):
        """`[(kind, parameter, shard dim or None)]` in Keras's order: per sublayer, kernel then bias."""
        out = []
        if not self.built:
            return out
        for name in _ORDER:
            proj = self._modules.get(name)
            if proj is None:
                continue
            out.append(("kernel", proj.kernel, proj.kernel_shard_dim))
            if proj.bias is not None:
                out.append(("bias", proj.bias, proj.bias_shard_dim))
        return out

    @property
    def weights(self) -> list[torch.Tensor]:
        """The parameters in Keras's order (empty before build)."""
        return [p for _, p, _ in self._keras_weights()]

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value) -> None:
        self._trainable = cfg.boolean("trainable", value)
        for p in self.parameters():
            p.requires_grad_(self._trainable)

    def get_weights(self) -> list[np.ndarray]:
        """Returns the weights as numpy arrays in Keras's order and shapes.

        Query kernel `(Dq, N, H)`, query bias `(N, H)`, key kernel `(Dk, N, H)`,
        key bias, [gate kernel, gate bias,] value kernel `(Dv, N, Hv)`, value
        bias `(N, Hv)`, output kernel `(N, Hv, *out)`, output bias `(*out)`;
        no biases when `use_bias=False`. bfloat16 weights come back as float32
        (numpy has no bfloat16). Under tensor parallelism the arrays are the
        full, unsharded weights (every rank of the group must call this).
        """
        arrays = []
        for _, p, dim in self._keras_weights():
            with torch.no_grad():
                t = sharding.gather_full(p.detach(), dim, self.tp_group)
            if t.dtype == torch.bfloat16:
                t = t.float()
            arrays.append(t.cpu().numpy().copy())
        return arrays

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
        weights = list(weights)
        if len(weights) != len(params):
            raise ValueError(
                f"You called `set_weights(weights)` on layer '{self.name}' with a weight list of "
                f"length {len(weights)}, but the layer was expecting {len(params)} weights."
            )
        for (_, p, dim), w in zip(params, weights):
            full_shape = list(p.shape)
            if dim is not None:
                full_shape[dim] *= self.tp_size
            if tuple(np.shape(w)) != tuple(full_shape):
                raise ValueError(
                    f"Layer {self.name} weight shape {tuple(full_shape)} is not compatible with "
                    f"provided weight shape {tuple(np.shape(w))}."
                )
        with torch.no_grad():
            for (_, p, dim), w in zip(params, weights):
                full = torch.as_tensor(np.asarray(w))
                p.copy_(sharding.own_slice(full, dim, self.tp_group).to(device=p.device, dtype=p.dtype))

    # -- checkpoints ----------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """Sharding metadata and RNG states, saved in `state_dict()` under `_extra_state`.

        `dist_mha.parallel.checkpoint.reshard_state_dicts` reads it to load a
        checkpoint written at one TP degree into a layer at another.
        """
        dims = {}
        for name in _ORDER:
            proj = self._modules.get(name)
            if proj is not None:
                dims[f"{name}.kernel"] = proj.kernel_shard_dim
                if proj.bias is not None:
                    dims[f"{name}.bias"] = proj.bias_shard_dim
        streams = self.rng_streams() if self.built else ()
        return tp_checkpoint.extra_state(self, dims, self._num_heads, "heads", streams)

    def set_extra_state(self, state) -> None:
        rng = tp_checkpoint.check_extra_state(self, state, self.name)
        by_name = {s.name: s for s in self.rng_streams()}
        for name, st in rng.items():
            if name in by_name:
                by_name[name].load_state_dict(st)

    # -- config ---------------------------------------------------------------------
    def get_config(self) -> dict:
        """The constructor arguments, with Keras's keys and serialisations."""
        return {
            "name": self.name,
            "trainable": self._trainable,
            "dtype": cfg.dtype_policy_config(self._param_dtype),
            "num_heads": self._num_heads,
            "key_dim": self._key_dim,
            "value_dim": self._value_dim,
            "dropout": self._dropout,
            "use_bias": self._use_bias,
            "use_gate": self._use_gate,
            "output_shape": self._output_shape,
            "attention_axes": self._attention_axes,
            "sliding_window": self._sliding_window,
            "kernel_initializer": initializers.serialize(self._kernel_initializer),
            "bias_initializer": initializers.serialize(self._bias_initializer),
            "kernel_regularizer": regularizers.serialize(self._kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self._bias_regularizer),
            "activity_regularizer": regularizers.serialize(self._activity_regularizer),
            "kernel_constraint": constraints.serialize(self._kernel_constraint),
            "bias_constraint": constraints.serialize(self._bias_constraint),
            "seed": self.seed,
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
        query_shape = tuple(query_shape)
        value_shape = tuple(value_shape)
        key_shape = value_shape if key_shape is None else tuple(key_shape)
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
    def losses(self) -> list[torch.Tensor]:
        """Differentiable penalties, in Keras's order: the latest call's activity
        penalties (query, key, [gate,] value, output; each divided by batch size),
        then the weight penalties (per weight, Keras order), computed now.

        Under tensor parallelism every penalty is that of the full tensor
        (shards' penalties summed across the group, so every rank of the group
        must read `losses`); its gradient reaches each rank's own shard."""
        out = list(self._activity_losses)
        for kind, p, dim in self._keras_weights():
            reg = self._kernel_regularizer if kind == "kernel" else self._bias_regularizer
            if reg is not None:
                out.append(sharding.penalty(reg, p, dim, self.tp_group))
        return out

    def apply_constraints(self) -> None:
        """Projects every constrained weight in place (what Keras's optimizer does after a step).

        Under tensor parallelism, norms that span shards are reduced across the
        group, so the result equals constraining the full weight."""
        with torch.no_grad():
            for kind, p, dim in self._keras_weights():
                c = self._kernel_constraint if kind == "kernel" else self._bias_constraint
                if c is not None:
                    p.copy_(sharding.constrain(c, p, dim, self.tp_group))

    def constraint_hook(self, optimizer: torch.optim.Optimizer):
        """Applies the constraints after every `optimizer.step()`; returns the hook handle.

        Example:

        >>> handle = layer.constraint_hook(optimizer)  # handle.remove() to stop
        """
        return optimizer.register_step_post_hook(lambda *_: self.apply_constraints())

    # -- activity regularisation --------------------------------------------------
    def _record_activity(self, q, k, gate, v, output) -> None:
        reg = self._activity_regularizer
        if reg is None:
            if self._activity_losses:
                self.__dict__["_activity_losses"] = []
            return
        self.__dict__["_activity_losses"] = []
        # Keras regularises each sublayer's output, divided by its batch size.
        # q/k/gate/v hold this rank's heads; the output is replicated, or
        # sharded on dim 1 under sequence parallelism.
        head_dim = q.dim() - 2
        for y in (q, k, gate, v):
            if y is not None:
                self._activity_losses.append(sharding.penalty(reg, y, head_dim, self.tp_group) / y.shape[0])
        out_dim = region.SEQ_DIM if self.sequence_parallel else None
        self._activity_losses.append(sharding.penalty(reg, output, out_dim, self.tp_group) / output.shape[0])

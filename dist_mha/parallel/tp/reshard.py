"""Resharding tensor-parallel state dicts from one TP degree to another (in memory).

Every sharded module (`MultiHeadAttention`, the parallel linears) puts an
`_extra_state` entry in its `state_dict()` saying how each of its tensors is
sharded (`shard_dims`), at which TP degree and rank, how many units the
sharded dim splits (`shard_units`: heads, features), plus RNG stream states. `reshard_state_dicts` uses that to turn
the state dicts of all ranks of a TP=a run into the state dict of one rank of
a TP=b run; it works on whole-model state dicts (keys carry module prefixes).
The files are `dist_mha.checkpoint`'s.
"""

from __future__ import annotations

import torch

FORMAT = "dist_mha.tp/1"


def extra_state(module, shard_dims: dict, shard_units: int, unit_name: str, streams=(), tensor_units=None) -> dict:
    """The `_extra_state` payload of a sharded module (see the module docstring).

    `tensor_units` overrides `shard_units` per tensor (key/value heads of
    grouped-query attention); a tensor with fewer units than TP ranks is
    replicated on `tp / units` consecutive ranks.
    """
    return {"format": FORMAT, "tp_size": getattr(module, "tp_size", 1), "tp_rank": getattr(module, "tp_rank", 0),
            "shard_units": shard_units, "unit_name": unit_name, "shard_dims": dict(shard_dims),
            "tensor_units": dict(tensor_units or {}), "rng": {s.name: s.state_dict() for s in streams}}


def _splits(units: int, tp_size: int) -> bool:
    return units % tp_size == 0 or tp_size % units == 0


def _full(parts: list, dim: int, units: int) -> torch.Tensor:
    """The full tensor from every old rank's shard; replicated units are taken once."""
    replicas = len(parts) // units if units < len(parts) else 1
    return torch.cat(parts[::replicas], dim=dim)


def _own(full: torch.Tensor, dim: int, units: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    if units < tp_size:
        return full.chunk(units, dim=dim)[tp_rank // (tp_size // units)].clone()
    return full.chunk(tp_size, dim=dim)[tp_rank].clone()


def check_extra_state(module, state, name: str) -> dict:
    """Validates a loaded `_extra_state` against `module`; returns its RNG states."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return {}
    if state["tp_size"] != module.tp_size or state["tp_rank"] != module.tp_rank:
        raise ValueError(
            f"This state dict holds TP rank {state['tp_rank']} of {state['tp_size']}, but '{name}' is rank "
            f"{module.tp_rank} of {module.tp_size}. Reshard it first with "
            "dist_mha.parallel.tp.reshard.reshard_state_dicts (or dist_mha.checkpoint.load_tp_shard)."
        )
    return state.get("rng", {})


def _layers(sd: dict) -> dict[str, dict]:
    """`{prefix: extra_state}` for every dist_mha layer in a state dict."""
    out = {}
    for key, value in sd.items():
        if key.endswith("_extra_state") and isinstance(value, dict) and value.get("format") == FORMAT:
            out[key[: -len("_extra_state")]] = value
    return out


def _check_shards(shards: list[dict], layers: dict, tp_size: int) -> None:
    """Every layer's shards are all there, in rank order, and split over `tp_size`."""
    for prefix, extra in layers.items():
        if extra["tp_size"] != len(shards):
            raise ValueError(
                f"Layer '{prefix or '<root>'}' was saved at TP={extra['tp_size']} but {len(shards)} shard(s) "
                "were given; pass every rank's state dict, in rank order."
            )
        for r, sd in enumerate(shards):
            if sd[prefix + "_extra_state"]["tp_rank"] != r:
                raise ValueError(f"Shard {r} holds TP rank {sd[prefix + '_extra_state']['tp_rank']}; pass shards in rank order.")
        all_units = {extra["shard_units"], *extra.get("tensor_units", {}).values()}
        if extra["shard_units"] % tp_size or not all(_splits(u, tp_size) for u in all_units):
            top = extra["shard_units"]
            valid = [d for d in range(1, top + 1) if top % d == 0 and all(_splits(u, d) for u in all_units)]
            raise ValueError(
                f"Cannot reshard layer '{prefix or '<root>'}' ({top} {extra['unit_name']}"
                + (f", tensors with {sorted(all_units)} units" if len(all_units) > 1 else "")
                + f" split across ranks) to TP={tp_size}; valid TP sizes: {valid}."
            )


def reshard_state_dicts(shards: list[dict], tp_size: int, tp_rank: int) -> dict:
    """The state dict of rank `tp_rank` of a TP=`tp_size` run, from all ranks of another run.

    Args:
        shards: the state dicts of TP ranks 0..a-1 of the saved run, in rank order.
        tp_size: the new TP degree.
        tp_rank: this rank's index in the new TP group.

    Returns:
        A state dict for `load_state_dict` on a model built at `tp_size`. At an
        unchanged TP degree it is this rank's own shard; otherwise per-rank
        RNG streams restart from their seeds (replicated ones are kept).

    Raises:
        ValueError: if shards are missing or out of order, or a layer's heads
            do not split over `tp_size`.
    """
    if not shards:
        raise ValueError("Received no shards to reshard.")
    if len(shards) == tp_size:
        # Same layout: this rank's own shard, per-rank state (RNG streams) included.
        own = shards[tp_rank]
        for extra in _layers(own).values():
            if extra["tp_rank"] != tp_rank:
                raise ValueError(f"Shard {tp_rank} holds TP rank {extra['tp_rank']}; pass shards in rank order.")
        return dict(own)
    layers = _layers(shards[0])
    _check_shards(shards, layers, tp_size)
    out = {}
    for key, value in shards[0].items():
        prefix = max((p for p in layers if key.startswith(p)), key=len, default=None)
        if prefix is None:
            out[key] = value
            continue
        extra = layers[prefix]
        local = key[len(prefix):]
        if local == "_extra_state":
            same = extra["tp_size"] == tp_size
            rng = dict(shards[tp_rank if same else 0][key]["rng"])
            if not same:
                # Per-rank streams belong to a rank of the old layout; the new
                # rank starts its own stream from the layer's seed.
                rng.pop("attention_dropout", None)
            out[key] = {**extra, "tp_size": tp_size, "tp_rank": tp_rank, "rng": rng}
            continue
        dim = extra["shard_dims"].get(local)
        if dim is None:
            out[key] = value
        else:
            units = extra.get("tensor_units", {}).get(local, extra["shard_units"])
            full = _full([sd[key] for sd in shards], dim, units)
            out[key] = _own(full, dim, units, tp_size, tp_rank)
    return out

"""Greedy generation from a trained run: `python launch/generate.py <run dir>` (or under torchrun).

Reads the run's saved Hydra config (`.hydra/config.yaml`) and its newest
checkpoint, rebuilds the `DecoderLM` at this launch's TP degree (any degree:
checkpoints reshard), and decodes with a KV cache. On the associative-recall
task it answers every query greedily (the queries themselves are given, the
answers are the model's) and reports the accuracy against chance; on text
data it continues a prompt and prints the bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dist_mha.models.decoder import DecoderLM
from dist_mha.models.generation import generate
from dist_mha.parallel import build_parallel_state
from dist_mha.train import checkpointing
from dist_mha.train import run_dir as run_dirs
from dist_mha.train.data import AssociativeRecall, make_data
from dist_mha.train.distributed import init_distributed
from dist_mha.train.setup import DTYPES


def load_model(run_dir: Path, tp_group, device, tp_mesh=None) -> tuple[DecoderLM, object, object]:
    """`(model in eval mode, data source, saved config)` from a run directory's config and newest checkpoint.

    DCP checkpoints (`dcp_checkpoints/`) load into a model on `tp_mesh` (DTensor parameters; needed when
    the TP group has several ranks), per-rank shards (`checkpoints/`) into one on `tp_group`.
    """
    from omegaconf import OmegaConf

    cfg_file = run_dir / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} does not exist: pass the run directory of a finished training run "
                                "(the one holding .hydra/ and checkpoints/).")
    cfg = OmegaConf.load(cfg_file)
    data = make_data(cfg.data, cfg.train.seed)
    m = cfg.model
    kind = _checkpoint_kind(run_dir)
    axis = (tp_mesh if tp_mesh is not None else tp_group) if kind == "dcp" else tp_group
    model = DecoderLM(data.vocab_size, data.seq_len, m.embed_dim, m.num_heads, m.num_layers, m.mlp_ratio,
                      num_kv_heads=m.get("num_kv_heads"), tp_group=axis, seed=cfg.train.seed, device=device,
                      dtype=DTYPES[cfg.train.dtype])
    ckpt = newest_intact_step(run_dir, kind)
    if kind == "dcp":
        from dist_mha.checkpoint import dcp

        dcp.load(ckpt, model)
    else:
        model.load_state_dict(checkpointing.load_model_state(ckpt, tp_group))
    return model.eval(), data, cfg


def _checkpoint_kind(run_dir: Path) -> str:
    """"dcp" when the run wrote DCP checkpoints (`train.checkpoint_format=dcp`), else "tp" (per-rank shards)."""
    return "dcp" if run_dirs.steps(Path(run_dir) / run_dirs.ROOTS["dcp"]) else "tp"


def newest_intact_step(run_dir: Path, kind: str | None = None) -> Path:
    """The newest checkpoint step that verifies (read-only: unlike a resume, nothing is set aside).

    Raises:
        FileNotFoundError: when the run dir holds no intact step (each one's problems listed).
    """
    root = run_dir / run_dirs.ROOTS[kind or _checkpoint_kind(run_dir)]
    problems = []
    for _, step_dir in run_dirs.steps(root):
        bad = run_dirs.verify_step(step_dir)
        if not bad:
            return step_dir
        problems.append(f"{step_dir.name}: {' '.join(bad)}")
    listing = "".join(f"\n  {p}" for p in problems)
    raise FileNotFoundError(f"No intact checkpoint in {root}{listing or ' (no steps)'}; train first (python launch/train.py), "
                            "or pass the run dir of a finished run.")


@torch.no_grad()
def recall_accuracy(model, data: AssociativeRecall, batches: int, batch_size: int, device) -> dict:
    """Greedy answers to every query of `batches` held-out batches; the queries are given, the answers generated.

    Also the teacher-forced accuracy (one full forward over the true
    sequence): the model may use earlier *true* answers (the last query's
    answer is the one value not yet asked for), so feeding back its own
    answers scores lower.
    """
    n, m = data.num_pairs, data.num_queries
    correct = total = forced = 0
    cache_bytes = 0
    for b in range(batches):
        tokens, targets, mask = data.batch(10**9 + b, 0, batch_size)  # steps no training run reaches
        tokens, targets, mask = tokens.to(device), targets.to(device), mask.to(device)
        forced += int((model(tokens).argmax(dim=-1)[mask] == targets[mask]).sum())
        cache = model.init_cache(batch_size, data.seq_len)
        logits = model(tokens[:, : 2 * n + 1], cache=cache)  # prefill: the pairs and the first query
        for i in range(m):
            answer = logits[:, -1].argmax(dim=-1)
            correct += int((answer == targets[:, 2 * n + 2 * i]).sum())
            total += batch_size
            if i + 1 < m:  # feed our answer, then the next (given) query
                step = torch.stack([answer, tokens[:, 2 * n + 2 * i + 2]], dim=1)
                logits = model(step, cache=cache)
        cache_bytes = cache.nbytes
    return {"accuracy": correct / total, "teacher_forced_accuracy": forced / total, "answers": total,
            "chance": 1.0 / data.num_values, "kv_cache_bytes_per_rank": cache_bytes}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a training run directory (outputs/<id>)")
    parser.add_argument("--batches", type=int, default=4, help="held-out recall batches to answer")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prompt", default="The ", help="text runs: the prompt to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="text runs: bytes to generate")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    info = init_distributed(args.device)
    state = build_parallel_state(info.world_size)  # every rank is one TP rank of the same model
    torch.manual_seed(0)
    model, data, cfg = load_model(args.run_dir, state.tp_group, info.device,
                                  state.mesh["tp"] if state.mesh is not None else None)
    if isinstance(data, AssociativeRecall):
        result = recall_accuracy(model, data, args.batches, args.batch_size, info.device)
    else:
        prompt = torch.tensor([list(args.prompt.encode())], dtype=torch.long, device=info.device)
        out = generate(model, prompt, min(args.max_new_tokens, data.seq_len - prompt.shape[1]))
        result = {"text": bytes(out[0].tolist()).decode("utf-8", errors="replace")}
    result.update(tp=info.world_size, num_kv_heads=cfg.model.get("num_kv_heads"),
                  checkpoint=str(newest_intact_step(args.run_dir)))
    if info.is_main:
        print(json.dumps(result), file=sys.stdout, flush=True)
        (args.run_dir / "generation.json").write_text(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result

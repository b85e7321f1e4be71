"""Training checkpoints in DCP format (`train.checkpoint_format=dcp`): any DP/TP/CP layout resumes them.

Layout: `<run_dir>/dcp_checkpoints/step_NNNNNNNN/` holds DCP's `.metadata`,
one `__R_0.distcp` per rank, `SHA256SUMS` and `manifest.json`. The protocol
is that of the per-rank shards (`dist_mha.train.checkpointing`): every rank
writes into `.step_NNNNNNNN.partial/`, rank 0 then records every file's size
and sha256 in `manifest.json`, renames the directory into place and moves
`latest`. Resuming verifies the step against its manifest (rank 0, in
`run_dir.find_resume`: a corrupt step is set aside and the previous one
used), then each rank checks a share of the files against `SHA256SUMS`
before DCP reads any (`dist_mha.checkpoint.dcp.load`).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from dist_mha.checkpoint import dcp
from dist_mha.train.checkpointing import _agree, _begin, _finish, _is_rank0
from dist_mha.train.run_dir import ROOTS


def save(run_dir, step: int, model, optimizer, meta: dict, *, manifest: dict, after_shard=None) -> Path:
    """Every rank (collective): writes and publishes step `step`; returns the step directory.

    Raises:
        OSError: naming the directory, the cause and the free space when a write fails
            (the partial step is removed).
    """
    root = Path(run_dir) / ROOTS["dcp"]
    partial = _begin(root, step)
    ok, error = True, None
    try:
        dcp.write(partial, model, optimizer, meta)
        if after_shard is not None:
            after_shard()
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        ok = False
        error = e if not _is_write_error(e) else OSError(
            errno.ENOSPC if "No space" in str(e) else errno.EIO,
            f"Could not write the DCP checkpoint into {partial} ({_first_line(e)}); "
            f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free there. If the disk is full, free space and rerun "
            "the same command: the run resumes from its last complete checkpoint.")
    try:
        _agree(ok, error, f"Writing the DCP checkpoint into {partial}")
    except BaseException:
        if _is_rank0():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    files = lambda: {f.name: None for f in sorted(partial.iterdir()) if f.is_file()}  # noqa: E731
    return _finish(root, step, partial, files, manifest, "dcp")


def _is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or "Errno" in str(e) or "No space" in str(e)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hits = [ln for ln in lines if "Error" in ln or "Errno" in ln]
    return (hits or lines or [type(e).__name__])[-1][:300]


def load(step_dir, model, optimizer) -> dict:
    """Every rank: loads a verified step directory into `model`/`optimizer` at this run's layout; returns `meta`."""
    return dcp.load(Path(step_dir), model, optimizer)


def resume(step_dir, model, optimizer, state) -> dict:
    """`load`, then, at another layout, CP ranks > 0 restart the streams of their own rows from their own seeds.

    The checkpoint's first layout position holds CP rank 0's streams; copying them would give every CP rank
    the same per-rank dropout masks.
    """
    from dist_mha.rng.streams import collect_streams

    own_seeds = {id(st): st.seed for st in collect_streams(model)}
    meta = load(step_dir, model, optimizer)
    layout = (meta.get("tp"), meta.get("cp"), meta.get("dp"))
    if state.cp_rank > 0 and layout != (state.tp_size, state.cp_size, state.dp_size):
        for st in collect_streams(model):
            if st.name in ("attention_dropout", "residual"):
                st.seed = own_seeds[id(st)]
                st.restore({})
    return meta

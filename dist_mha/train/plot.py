"""The loss curve of a run, labelled for its data source."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("dist_mha.train")


def plot_loss(metrics_path: Path, out: Path, data) -> list[str] | None:
    """Writes the loss curve with the data's no-context floor; returns the legend labels (None without matplotlib).

    Args:
        metrics_path: the run's `metrics.jsonl`.
        out: the PNG to write.
        data: the run's data source; its `loss_label`, `floor_label` and
            `chance_loss` say what the loss is measured on and what a model
            without the context would reach.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping the loss-curve PNG (pip install 'dist_mha[launch]')")
        return None
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=data.loss_label)
    ax.axhline(data.chance_loss, color="gray", linestyle="--", label=data.floor_label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return labels

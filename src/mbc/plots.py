"""Figures from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    validation = [r for r in records if r["kind"] == "validation"]
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot([r["step"] for r in train], [r["qa"] for r in train], label="train QA loss")
    loss_ax.plot([r["step"] for r in train], [r["vq"] for r in train], label="train VQ loss")
    if validation:
        loss_ax.plot([r["step"] for r in validation], [r["loss"] for r in validation], "o-", label="validation QA loss")
        score_ax.plot([r["step"] for r in validation], [r["em"] for r in validation], "o-", label="validation EM")
        score_ax.plot([r["step"] for r in validation], [r["f1"] for r in validation], "o-", label="validation F1")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_yscale("log")
    loss_ax.legend()
    score_ax.set_xlabel("optimizer step")
    score_ax.set_ylabel("percent")
    score_ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

"""Figures: a training run's loss curve (from metrics.jsonl), and the online evaluation's retention
and bank-size curves (from its summary)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    plt = _pyplot()
    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    validation = [r for r in records if r["kind"] == "validation" and "loss" in r]  # none during a warm start
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(10, 4))
    qa = [r for r in train if r["qa"] > 0]  # 0 while a probe warm start trains on the answer probe instead
    loss_ax.plot([r["step"] for r in qa], [r["qa"] for r in qa], label="train QA loss")
    probe = [r for r in train if r.get("probe", 0) > 0]
    if probe:
        loss_ax.plot([r["step"] for r in probe], [r["probe"] for r in probe], label="train answer-probe loss")
    loss_ax.plot([r["step"] for r in train], [r["vq"] for r in train], label="train VQ loss")
    if validation:
        loss_ax.plot([r["step"] for r in validation], [r["loss"] for r in validation], "o-", label="validation QA loss")
        score_ax.plot([r["step"] for r in validation], [r["em"] for r in validation], "o-", label="validation EM")
        score_ax.plot([r["step"] for r in validation], [r["f1"] for r in validation], "o-", label="validation F1")
        gaps = [r for r in validation if "gap_em" in r]
        if gaps:  # own documents minus unrelated ones: what the memory carries
            score_ax.plot([r["step"] for r in gaps], [r["gap_em"] for r in gaps], "s--", label="reading gap, EM")
            score_ax.plot([r["step"] for r in gaps], [r["gap_f1"] for r in gaps], "s--", label="reading gap, F1")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_yscale("log")
    loss_ax.legend()
    score_ax.set_xlabel("optimizer step")
    score_ax.set_ylabel("percent")
    if validation:
        score_ax.legend()
    else:  # a run without validation (the main job's adapters): say so instead of an empty legend
        score_ax.text(0.5, 0.5, "no validation in this run", ha="center", va="center", transform=score_ax.transAxes)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _finish(plt, fig, ax, xlabel: str, ylabel: str, png_path: Path, log_y: bool = False) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _shown(name: str) -> str:
    """A curve's key as the papers write it: "mbc" -> "MBC"; a method's full name as it is."""
    return {"mbc": "MBC", "mac": "MAC"}.get(name, name)


def plot_retention(curves: dict[str, list[dict]], png_path: Path) -> None:
    """F1 on the first documents' questions, relative to right after they were streamed, in percent."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, curve in curves.items():
        points = [p for p in curve if p.get("retention_percent") is not None]
        ax.plot([p["documents"] for p in points], [p["retention_percent"] for p in points], "o-", label=_shown(name))
    _finish(plt, fig, ax, "documents streamed", "F1 retention (%)", png_path)


def plot_bank_size(curves: dict[str, list[dict]], png_path: Path) -> None:
    """Bytes stored against documents streamed: each bank as stored, and MAC's float32 bank for comparison."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, curve in curves.items():
        ax.plot([p["documents"] for p in curve], [p["stored_bytes"] for p in curve], "o-", label=f"{_shown(name)} bank")
    if "mac" not in curves and curves:
        curve = next(iter(curves.values()))
        ax.plot(
            [p["documents"] for p in curve],
            [p["mac_equivalent_bytes"] for p in curve],
            "s--",
            label="MAC float32 (same documents)",
        )
    _finish(plt, fig, ax, "documents streamed", "bytes", png_path, log_y=True)


def plot_retention_and_recall(curves: dict[str, list[dict]], png_path: Path) -> None:
    """Left: F1 retention (solid) and the retrieval keys' recall of the own document (dashed) on
    the first documents' questions; right: their F1 itself, since a method can keep all of very
    little. Both against documents streamed."""
    plt = _pyplot()
    fig, (ax, f1_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        documents = [p["documents"] for p in curve]
        kept = [p for p in curve if p["retention_percent"] is not None]  # none where the first F1 was 0
        line = ax.plot(
            [p["documents"] for p in kept],
            [p["retention_percent"] for p in kept],
            "o-",
            label=f"{_shown(name)} F1 retention",
        )
        color = line[0].get_color()
        if all(p["recall_percent"] is not None for p in curve):
            recall = [p["recall_percent"] for p in curve]
            label = f"{_shown(name)} keys' recall"
            ax.plot(documents, recall, "s--", color=color, label=label)
        f1_ax.plot(documents, [p["f1"] for p in curve], "o-", color=color, label=_shown(name))
        start = curve[0].get("before_stream")
        if start:  # where a fine-tuned LLM began: below it, the stream cost more than it taught
            f1_ax.axhline(start["f1"], color=color, linestyle=":", label=f"{_shown(name)} before the stream")
    # From 50% at least: an axis drawn around 99-100% would make a 0.5% loss look like a fall.
    values = [p[key] for curve in curves.values() for p in curve for key in ("retention_percent", "recall_percent")]
    values = [v for v in values if v is not None] or [100.0]
    ax.set_ylim(min(50.0, min(values) - 5), max(102.0, max(values) + 3))
    f1_ax.set_ylim(0, 100)
    f1_ax.set_xlabel("documents streamed")
    f1_ax.set_ylabel("F1 on the first documents' questions")
    f1_ax.legend(fontsize="small")
    _finish(plt, fig, ax, "documents streamed", "percent", png_path)

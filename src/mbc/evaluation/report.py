"""What the online evaluation writes and prints: per-question predictions and the summary table."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from mbc.data import QAExample
from mbc.evaluation.metrics import exact_match, f1_score, lenient_exact_match


def write_predictions(path: Path, rows: list[QAExample], results: dict) -> None:
    temporary = path.with_suffix(".csv.tmp")
    with temporary.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "question", "answers", "prediction", "em", "f1", "lenient_em"])
        for name, result in results.items():
            for row, prediction in zip(rows, result.predictions):
                golds = list(row.answers)
                writer.writerow(
                    [
                        name,
                        row.question,
                        " | ".join(golds),
                        prediction,
                        exact_match(prediction, golds),
                        round(f1_score(prediction, golds), 4),
                        lenient_exact_match(prediction, golds),
                    ]
                )
    shutil.move(temporary, path)


def format_table(summary: dict) -> str:
    header = f"{'method':<28}{'EM':>6}{'F1':>6}{'len.EM':>8}{'bytes/doc':>11}{'adapt ms/doc':>14}{'adapt MB':>10}"
    lines = [header + f"{'answer ms/q':>13}"]
    for name, m in summary["methods"].items():
        adapt = "-" if m["adapt_ms_per_document"] is None else f"{m['adapt_ms_per_document']:.1f}"
        memory = "-" if m.get("adapt_peak_mb") is None else f"{m['adapt_peak_mb']:,.0f}"
        lines.append(
            f"{name:<28}{m['em']:>6.1f}{m['f1']:>6.1f}{m['lenient_em']:>8.1f}{m['bytes_per_document']:>11,.0f}"
            f"{adapt:>14}{memory:>10}{m['answer_ms_per_question']:>13.1f}"
        )
    return "\n".join(lines + _kind_table(summary["methods"]))


def _kind_table(methods: dict) -> list[str]:
    """EM / F1 by answer kind (generated data only): which facts the memory carries."""
    kinds = next((m["by_answer_kind"] for m in methods.values() if "by_answer_kind" in m), None)
    if kinds is None:
        return []
    header = "".join(f"{kind + ' (' + str(s['questions']) + ')':>18}" for kind, s in kinds.items())
    lines = ["", f"{'EM / F1 by answer kind':<28}{header}"]
    for name, m in methods.items():
        cells = [f"{s['em']:.1f} / {s['f1']:.1f}" for s in m["by_answer_kind"].values()]
        lines.append(f"{name:<28}" + "".join(f"{cell:>18}" for cell in cells))
    return lines

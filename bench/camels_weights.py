"""What a CaMeLS weighting model learned: documents drawn token by token, each on a shade of its weight.

    .venv/bin/python bench/camels_weights.py runs/camels --qa-tuned runs/qa-tuned --data generated \
        --split validation --documents 3 --output docs/figures/camels-weights.png

Prints each document's tokens with their weights, the mean weight by kind of token (salient by the
rules of finetuning.py, or not), and draws the figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mbc import data as qa_data  # noqa: E402
from mbc.camels import WeightingModel  # noqa: E402
from mbc.finetuning import ClosedBookLLM, salient_token_mask  # noqa: E402


def weighted_tokens(weigher: WeightingModel, model: ClosedBookLLM, document: str):
    """(token text, weight, salient by rule) for each token of the document."""
    windows, offsets = model.document_rows(document, weigher.config.max_document_tokens)
    with torch.no_grad():
        weights = weigher.weights([ids for ids, _ in windows])
    ids = [t for window, _ in windows for t in window]
    flat = [w for (window, _), row in zip(windows, weights) for w in row[: len(window)].tolist()]
    salient = salient_token_mask(document, offsets)
    return [(model.tokenizer.decode([t]), w, s) for t, w, s in zip(ids, flat, salient)]


def draw(documents: list[list[tuple[str, float, bool]]], output: Path, width: int = 95) -> None:
    lines = []
    for tokens in documents:
        line, length = [], 0
        for text, weight, _ in tokens:
            text = text.replace("\n", " ")
            if length + len(text) > width and line:
                lines.append(line)
                line, length = [], 0
            line.append((text, weight))
            length += len(text)
        lines += [line, []]
    high = max(w for tokens in documents for _, w, _ in tokens)
    figure = plt.figure(figsize=(12, 0.32 * len(lines) + 0.6))
    colours = plt.get_cmap("Oranges")
    for row, line in enumerate(lines):
        x = 0.01
        for text, weight in line:
            shown = figure.text(
                x,
                1 - (row + 1) / (len(lines) + 1),
                text,
                family="monospace",
                fontsize=9,
                bbox={"facecolor": colours(weight / high), "edgecolor": "none", "pad": 1.5},
            )
            x += shown.get_window_extent(figure.canvas.get_renderer()).width / figure.bbox.width
    figure.suptitle(f"CaMeLS token weights (darker: heavier; the heaviest {high:.2f})", fontsize=10)
    figure.savefig(output, dpi=120, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("camels", help="a weighting model folder (`mbc train-camels`)")
    parser.add_argument("--qa-tuned", required=True, help="the QA-tuned LLM it was trained for")
    parser.add_argument("--data", default="generated")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("runs/camels-weights.png"))
    args = parser.parse_args()
    model = ClosedBookLLM.load_qa_tuned(args.qa_tuned)
    weigher = WeightingModel.load(args.camels, model, args.qa_tuned)
    texts = qa_data.documents(qa_data.load_splits(args.data)[args.split])[: args.documents]
    documents = [weighted_tokens(weigher, model, text) for text in texts]
    for tokens in documents:
        print(" ".join(f"{t.strip()}:{w:.2f}" for t, w, _ in tokens))
    every = [token for tokens in documents for token in tokens]
    for label, kind in (("salient (rules)", True), ("other", False)):
        chosen = [w for _, w, s in every if s == kind]
        print(f"mean weight, {label} tokens: {sum(chosen) / max(len(chosen), 1):.3f} ({len(chosen)} tokens)")
    draw(documents, args.output)
    print(f"drawn to {args.output}")


if __name__ == "__main__":
    main()

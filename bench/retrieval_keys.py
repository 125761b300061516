"""How often does a question's retrieval key pick its own document, and how many bytes does that take?

    .venv/bin/python bench/retrieval_keys.py [--data generated,../shared/data/squad/squad-v1.1-dev-open.json]
                                             [--subspaces 8,16,32,48] [--first 50]

For each data set: the product quantizer (retrieval.py) is fitted on the training split's
documents, then every test question is scored against the keys of the test documents (the first
``--first`` of them, then all). Prints the share of questions whose own document scores best
(top-1) and is among the best two (top-2), for the float sentence embedding (1,536 bytes per
document) and for each number of one-byte key pieces. BM25's recall on the same documents is what
``mbc eval`` prints beside its BM25 baseline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mbc import data as qa_data
from mbc.network import backbones
from mbc.network.retrieval import ProductQuantizer, SentenceEmbedder

SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "squad-v1.1-dev-open.json"


def recall(scores: torch.Tensor, own: torch.Tensor) -> tuple[float, float]:
    top = scores.topk(min(2, scores.shape[1]), dim=1).indices
    return 100 * float((top[:, 0] == own).float().mean()), 100 * float((top == own[:, None]).any(1).float().mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=",".join(["generated", *([str(SQUAD)] if SQUAD.exists() else [])]))
    parser.add_argument("--subspaces", default="8,16,32,48")
    parser.add_argument("--first", type=int, default=50, help="also score a bank of only the first N test documents")
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = backbones.load_encoder()
    embedder = SentenceEmbedder(encoder.model, encoder.tokenizer, max_tokens=256)

    print(f"{'data':<12}{'documents':>10}{'questions':>10}   {'key':<22}{'bytes':>6}{'top-1 %':>9}{'top-2 %':>9}")
    for spec in args.data.split(","):
        splits = qa_data.load_splits(spec)
        training = embedder(qa_data.documents(splits["train"]))
        quantizers = {}
        for pieces in (int(s) for s in args.subspaces.split(",")):
            quantizers[pieces] = ProductQuantizer(training.shape[1], pieces, 256)
            quantizers[pieces].fit(training)
        name = "generated" if spec.startswith("generated") else Path(spec).stem[:11]
        for rows in (qa_data.first_documents(splits["test"], args.first), splits["test"]):
            documents = qa_data.documents(rows)
            vectors, questions = embedder(documents), embedder([r.question for r in rows])
            own = torch.tensor([documents.index(r.document) for r in rows])
            lines = [("float32 embedding", 4 * vectors.shape[1], recall(questions @ vectors.T, own))]
            for pieces, quantizer in quantizers.items():
                lines.append(
                    (
                        f"{pieces} pieces x 256 codes",
                        pieces,
                        recall(quantizer.scores(questions, quantizer.encode(vectors)), own),
                    )
                )
            for label, size, (top1, top2) in lines:
                print(f"{name:<12}{len(documents):>10}{len(rows):>10}   {label:<22}{size:>6}{top1:>9.1f}{top2:>9.1f}")


if __name__ == "__main__":
    main()

"""Does a trained checkpoint answer better from the right documents, and how does that depend on
how many documents share the bank?

    .venv/bin/python bench/bank_size.py CHECKPOINT [--data generated] [--questions 300] [--sizes 1,5,50] [--top-k K]

The first ``--questions`` validation questions are grouped by document; for each bank size B the
documents are taken B at a time, and each group's questions are answered (greedy) and scored with
a bank of exactly those B documents, then with a bank of B unrelated (training) documents. Prints
EM, F1 and teacher-forced QA loss for both, and how many answers the swap changed. For a model
with retrieval keys (``retrieval_top_k`` > 0; ``--top-k`` overrides it) also the share of
questions whose own document was among those they read from the right bank.
"""

from __future__ import annotations

import argparse

from mbc import MBCModel
from mbc import data as qa_data
from mbc.evaluation.validation import evaluate, reader_over, retrieval_recall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="generated")
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--sizes", default="1,5,50")
    parser.add_argument(
        "--top-k", type=int, default=None, help="documents each question reads (a retrieval model only)"
    )
    args = parser.parse_args()
    model = MBCModel.from_pretrained(args.checkpoint).eval()
    if args.top_k is not None:
        if model.retrieval_keys is None:
            parser.error("--top-k needs a checkpoint trained with retrieval_top_k > 0")
        model.config.retrieval_top_k = args.top_k
    splits = qa_data.load_splits(args.data)
    rows = splits["validation"][: args.questions]
    documents, unrelated = qa_data.documents(rows), qa_data.documents(splits["train"])
    print(f"{len(rows)} validation questions about {len(documents)} documents")
    recall_column = "   read own document" if model.retrieval_keys is not None else ""
    print(
        f"{'bank size':>9}  {'right EM':>8} {'F1':>6} {'loss':>6}   {'unrelated EM':>12} {'F1':>6} {'loss':>6}   answers changed"
        + recall_column
    )
    for size in (int(s) for s in args.sizes.split(",")):
        totals = {"right": [0.0, 0.0, 0.0], "unrelated": [0.0, 0.0, 0.0]}
        changed, found = 0, 0.0
        for start in range(0, len(documents), size):
            group = documents[start : start + size]
            questions = [r for r in rows if r.document in set(group)]
            results = {
                "right": evaluate(model, questions, bank_documents=group),
                "unrelated": evaluate(model, questions, bank_documents=unrelated[start : start + len(group)]),
            }
            for name, result in results.items():
                for i, key in enumerate(("em", "f1", "loss")):
                    totals[name][i] += result.metrics[key] * len(questions)
            changed += sum(a != b for a, b in zip(results["right"].predictions, results["unrelated"].predictions))
            if model.retrieval_keys is not None:
                reader = reader_over(model, group)
                found += retrieval_recall(reader, questions, dict(zip(group, reader.bank.ids()))) * len(questions) / 100
        right, other = ([v / len(rows) for v in totals[n]] for n in ("right", "unrelated"))
        print(
            f"{size:>9}  {right[0]:>8.1f} {right[1]:>6.1f} {right[2]:>6.3f}   {other[0]:>12.1f} {other[1]:>6.1f} {other[2]:>6.3f}"
            f"   {changed} of {len(rows)}" + (f"   {100 * found / len(rows):.1f}%" if recall_column else "")
        )


if __name__ == "__main__":
    main()

"""How many tokens a token memory (src/mbc/token_memory.py) should keep: one scorer, several K.

    .venv/bin/python bench/token_memory.py [--data generated] [--keep 24,32,40,48] [--documents 50] [--before 2]

Fits a token memory on the training split (`train_token_memory`, as `mbc train-tokens` does), then
for each K (and every token: "all") answers the validation split's first ``--documents`` documents'
questions from a bank of those documents and from a bank of as many unrelated training documents
(choose K here; the test split is for final models, through `mbc eval --tokens`). Prints EM / F1
(by answer kind on generated documents) for both, the keys' recall of the own document, and bytes
per document (2 per kept token + the retrieval key) beside the text's own size, raw and zstd.
Writes runs/token_memory/<data>[-beforeN].json.

(The figures of "A memory of the document's own tokens" in docs/JOURNAL.md came from this script's first version, `git show
d472cce:bench/token_memory.py`, which fitted the scorer from a random start rather than zeros.)
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def text_sizes(texts: list[str]) -> tuple[float, float]:
    """Mean bytes per document: UTF-8, and zstd (level 19) of each document alone."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=19)
    raw = [t.encode("utf-8") for t in texts]
    return sum(map(len, raw)) / len(raw), sum(len(compressor.compress(r)) for r in raw) / len(raw)


def score_token_memory(model, rows, unrelated: list[str]) -> dict:
    """EM / F1 (and by answer kind, on generated data) answering ``rows`` from a bank of their own
    documents and from one of ``unrelated`` documents; the keys' recall; bytes per document."""
    from mbc.data import documents
    from mbc.data.generated import answer_kinds
    from mbc.evaluation.metrics import score, score_by_group
    from mbc.evaluation.validation import chunks, reader_over, retrieval_recall
    from mbc.memory.readers import answer_from_bank

    golds, kinds, stream = [list(r.answers) for r in rows], answer_kinds(rows), documents(rows)
    result = {"bytes": sum(model.bytes_per_document().values())}
    for prefix, texts in (("", stream), ("control_", unrelated)):
        reader = reader_over(model, texts)
        predictions = [a for c in chunks(rows, 64) for a in answer_from_bank(model, reader, [r.question for r in c])]
        result |= {f"{prefix}{k}": v for k, v in score(predictions, golds).items() if k != "lenient_em"}
        result[f"{prefix}by_kind"] = score_by_group(predictions, golds, kinds) if kinds else None
        if not prefix:
            result["recall"] = retrieval_recall(reader, rows, dict(zip(stream, reader.bank.ids())))
            stored = reader.bank.entries(reader.bank.ids()[:1])
            result["example"] = model.texts(stored)[0]
        reader.bank.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="generated")
    parser.add_argument("--keep", default="24,32,40,48", help="tokens kept per document, comma-separated")
    parser.add_argument("--documents", type=int, default=50, help="validation documents streamed")
    parser.add_argument("--before", type=int, default=2, help="also learn to keep N tokens ahead of an answer")
    args = parser.parse_args()

    from mbc import data as qa_data
    from mbc.token_memory import TokenMemoryConfig
    from mbc.training.token_memory import train_token_memory

    start = time.perf_counter()
    splits = qa_data.load_splits(args.data)
    rows = qa_data.first_documents(splits["validation"], args.documents)
    stream = qa_data.documents(rows)
    unrelated = qa_data.documents(splits["train"])[: len(stream)]
    model = train_token_memory(splits["train"], TokenMemoryConfig(), args.before)
    print(f"token memory fitted, {time.perf_counter() - start:.0f} s; {len(rows)} questions", flush=True)
    lengths = {
        t: len(model.llm.tokenizer(t, truncation=True, max_length=model.config.max_document_tokens)["input_ids"])
        for t in stream + unrelated
    }
    results, longest = [], max(lengths.values())
    for keep in [int(k) for k in args.keep.split(",")] + [longest]:
        result = {"keep": keep if keep < longest else "all", **score_token_memory(model.keeping(keep), rows, unrelated)}
        if keep == longest:  # the bank pads each document to the longest; stored alone, each takes its length
            key = model.bytes_per_document()["retrieval_key"]
            result["bytes"] = 2 * sum(lengths[t] for t in stream) / len(stream) + key
        results.append(result)
        kinds = ""
        if result["by_kind"]:
            kinds = "  " + "  ".join(
                f"{k} {v['em']:.1f}/{result['control_by_kind'][k]['em']:.1f}"
                for k, v in sorted(result["by_kind"].items())
            )
        print(
            f"keep {str(result['keep']):>4}  {result['bytes']:6.0f} B  EM {result['em']:5.1f}  F1 {result['f1']:5.1f}  "
            f"unrelated EM {result['control_em']:5.1f}  F1 {result['control_f1']:5.1f}  recall {result['recall']:5.1f}"
            f"{kinds}",
            flush=True,
        )
    raw, zstd = text_sizes(stream)
    print(f"document text: {raw:.0f} bytes raw, {zstd:.0f} bytes zstd -19 (each document alone)")
    print(f"e.g. {stream[0]!r}\n  kept at {results[0]['keep']}: {results[0]['example']!r}")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.data).stem) + (f"-before{args.before}" if args.before else "")
    output = ROOT / "runs" / "token_memory" / f"{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = {"data": args.data, "before": args.before, "questions": len(rows), "results": results}
    output.write_text(json.dumps(summary | {"text_bytes": {"raw": raw, "zstd": zstd}}, indent=1))
    print(f"{time.perf_counter() - start:.0f} s; written to {output}")


if __name__ == "__main__":
    main()

"""How a paragraph's bytes should split between its retrieval key and its copied codes.

    .venv/bin/python bench/key_budget.py runs/squad-copy-k80-b120-h1200-j300/last \
        --data ../shared/data/squad/squad-v1.1-dev-open.json --extra-train ../shared/data/squad/squad-v1.1-train-first11.json
    .venv/bin/python bench/key_budget.py CHECKPOINT --data ... --extra-train ... --rebudget 16,48 --output runs/k16-b48

A MBC adapter with copied vocabulary codes (``pointer_copy``, ``code_entry_bytes``) stores per
document a retrieval key (a frozen MiniLM embedding, product-quantized: one byte a piece) and the
longest head of its codes that fits the entry's bytes; a question reads the document that scores
best on the key plus ``lexical_weight`` x BM25 over the stored codes (model.top_documents). Neither
the key nor the head's length is learned, so one trained adapter answers for every split of a
budget: printed, for every paragraph of the split at once, the share of questions whose own
paragraph scores best, by total bytes, key bytes and BM25 weight, beside the float embedding and
BM25 over the whole paragraph.

``--rebudget KEY,ENTRY[,INDEX] --output DIR`` writes the adapter with that key (its centroids fitted
on the training documents, as training does), that entry size and that many bytes of rare tokens
after the codes for BM25 (``index_entry_bytes``), so that ``mbc eval`` measures what the split reads.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from mbc import data as qa_data
from mbc.checkpoint import read_config
from mbc.model import MBCModel
from mbc.network.lexical import bm25, combined, padded_ids
from mbc.network.retrieval import ProductQuantizer

WEIGHTS = (0.3, 1.0, 2.0)


def rebudget(
    checkpoint: str, key_bytes: int, entry_bytes: int, train_documents: list[str], index_bytes: int = 0
) -> MBCModel:
    """The adapter in ``checkpoint`` with another key size, entry size and index, its key refitted."""
    trained = MBCModel.from_pretrained(checkpoint)
    state = {k: v for k, v in trained.trainable_state_dict().items() if not k.startswith("retrieval_keys.")}
    model = MBCModel.build(
        replace(
            read_config(checkpoint),
            retrieval_subspaces=key_bytes,
            code_entry_bytes=entry_bytes,
            index_entry_bytes=index_bytes,
        )
    )
    model.load_state_dict(state, strict=False)
    model.trained_on = trained.trained_on
    model.retrieval_keys.fit(train_documents)
    return model


def stored_codes(model: MBCModel, texts: list[str], batch_size: int = 16) -> list[list[int]]:
    """Each document's codes as its entry keeps them (the head that fits ``code_entry_bytes``)."""
    return [
        row
        for i in range(0, len(texts), batch_size)
        for row in model.codec.token_ids(model.compress(texts[i : i + batch_size]))
    ]


def padded(rows: list[list[int]]) -> torch.Tensor:
    return padded_ids(rows, max(map(len, rows)), pad=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="a MBC checkpoint with pointer_copy and code_entry_bytes")
    parser.add_argument("--data", required=True, help="the data it was trained on (its split is rebuilt)")
    parser.add_argument("--extra-train", action="append", default=[], help="the extra training data it read")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--totals", default="128,96,64", help="bytes per paragraph: key + codes")
    parser.add_argument("--keys", default="8,16,32", help="key bytes tried within each total")
    parser.add_argument("--rebudget", default=None, help="KEY,ENTRY[,INDEX]: write the adapter so to --output")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    splits = qa_data.load_splits(args.data, None, tuple(args.extra_train))
    train_documents = qa_data.documents(splits["train"])
    if args.rebudget:
        if not args.output:
            raise SystemExit("--rebudget needs --output DIR")
        key_bytes, entry_bytes, *index_bytes = (int(x) for x in args.rebudget.split(","))
        model = rebudget(args.adapter, key_bytes, entry_bytes, train_documents, *index_bytes)
        model.save_pretrained(args.output)
        print(f"written {args.output}: {model.bytes_per_document()}")
        return

    model = MBCModel.from_pretrained(args.adapter).eval()
    if model.prefix_code is None or not model.config.pointer_copy:
        raise SystemExit(
            f"{args.adapter} does not store copied codes under a prefix code (pointer_copy, code_entry_bytes)"
        )
    rows = splits[args.split]
    texts = qa_data.documents(rows)
    questions = [r.question for r in rows]
    own = torch.as_tensor([texts.index(r.document) for r in rows])

    def first(scores: torch.Tensor) -> float:
        return 100 * float((scores.argmax(1) == own).float().mean())

    embedder = model.retrieval_keys.embedder
    documents, asked_embedded = embedder(texts), embedder(questions)
    train_embedded = embedder(train_documents)
    asked = model.llm.tokenizer(questions, add_special_tokens=False)["input_ids"]
    codes, coder = stored_codes(model, texts), model.prefix_code.coder()
    print(f"{args.split}: {len(texts)} paragraphs, {len(rows)} questions; own paragraph first, %")
    print(f"float embedding ({4 * documents.shape[1]} bytes): {first(asked_embedded @ documents.T):.1f}")
    print(f"BM25 over the whole paragraph: {first(bm25(asked, padded(model.llm_token_ids(texts)), pad=-1)):.1f}")
    print(f"{'total':>5} {'key':>4} {'codes':>6} {'kept':>5} {'key alone':>10} {'BM25 alone':>11}", end="")
    print("".join(f"{f'w={w:g}':>8}" for w in WEIGHTS))
    key_scores = {}
    for key_bytes in sorted({int(k) for k in args.keys.split(",")}):
        quantizer = ProductQuantizer(documents.shape[1], key_bytes, model.config.retrieval_codes)
        quantizer.fit(train_embedded)
        key_scores[key_bytes] = quantizer.scores(asked_embedded, quantizer.encode(documents))
    for total in (int(t) for t in args.totals.split(",")):
        for key_bytes, scores in key_scores.items():
            kept = [coder.longest_head(row, total - key_bytes) for row in codes]
            lexical = bm25(asked, padded(kept), pad=-1)
            print(
                f"{total:>5} {key_bytes:>4} {total - key_bytes:>6} {sum(map(len, kept)) / len(kept):>5.1f}"
                f" {first(scores):>10.1f} {first(lexical):>11.1f}"
                + "".join(f"{first(combined(scores, lexical, w)):>8.1f}" for w in WEIGHTS)
            )


if __name__ == "__main__":
    main()

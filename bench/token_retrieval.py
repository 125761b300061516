"""Which stored paragraph does a question read? A token memory's retrieval, scored every way at once.

    .venv/bin/python bench/token_retrieval.py runs/tokens-squad-k60-key8 \
        --data ../shared/data/squad/squad-v1.1-dev-open.json --split validation [--documents 50]

For each question of the split, whether its own paragraph scores highest among all of the split's
paragraphs (recall@1, in percent) by: the stored retrieval key alone; BM25 over the kept tokens
alone; the key plus w x BM25 (the memory's ``lexical_weight``); and the sentence embedding of the
kept tokens decoded as text, which the reader can compute from the stored codes at no stored
byte, alone and with BM25. The last two say what a memory would find with no key at all, its
whole budget spent on tokens. Scores are standardised over the bank before they are added
(network/lexical.py).
"""

from __future__ import annotations

import argparse

import torch

from mbc import data as qa_data
from mbc.network.lexical import bm25, combined, standardised
from mbc.token_memory import TokenMemory

WEIGHTS = (0.3, 0.6, 1.0, 2.0)


def recall(scores: torch.Tensor, own: torch.Tensor) -> float:
    return 100 * (scores.argmax(1) == own).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("memory", help="a token memory folder (`mbc train-tokens`)")
    parser.add_argument("--data", default="generated")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--documents", type=int, default=None, help="only the split's first N documents")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = TokenMemory.from_pretrained(args.memory)
    rows = qa_data.first_documents(qa_data.load_splits(args.data)[args.split], args.documents)
    texts = qa_data.documents(rows)
    position = {text: i for i, text in enumerate(texts)}
    own = torch.tensor([position[r.document] for r in rows])
    questions = [r.question for r in rows]

    keys = model.retrieval_keys.keys_of(texts)
    kept = model.kept_ids(texts)
    tokens = torch.as_tensor(model.codec.encode(kept)[:, :, 0].astype("int64"))
    key = model.retrieval_keys.scores(questions, keys)
    lexical = bm25(model.llm.tokenizer(questions)["input_ids"], tokens, model.codec.pad)
    embedder = model.retrieval_keys.embedder
    dense = embedder(questions) @ embedder([model.llm.tokenizer.decode(ids) for ids in kept]).T
    dense_full = embedder(questions) @ embedder(texts).T

    key_bytes = model.retrieval_keys.bytes_per_document()
    print(
        f"{args.memory}: {len(rows)} questions over {len(texts)} {args.split} paragraphs, "
        f"{model.config.keep} kept tokens + a {key_bytes}-byte key; own paragraph first, % of questions"
    )
    table = {
        f"key ({key_bytes} bytes) alone": key,
        "BM25 over the kept tokens alone": lexical,
        **{f"key + {w} x BM25": combined(key, lexical, w) for w in WEIGHTS},
        "embedding of the kept tokens (0 bytes)": dense,
        **{f"kept-token embedding + {w} x BM25": combined(dense, lexical, w) for w in WEIGHTS},
        "key + kept-token embedding + 0.6 x BM25": standardised(key) + combined(dense, lexical, 0.6),
        "unquantized embedding of the whole paragraph (reference)": dense_full,
    }
    for name, scores in table.items():
        print(f"  {name:58s} {recall(scores, own):5.1f}")


if __name__ == "__main__":
    main()

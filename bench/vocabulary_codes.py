"""What a MBC adapter with vocabulary codes (``codebook="vocabulary"``) stores: a few documents' codes
decoded as tokens, and over a split how many codes name a token the document does not contain,
how many name one of its answer tokens (what the naming steps teach, training/naming.py), how
many distinct tokens the bank uses, and the bytes the codes take under a prefix code fitted on the
training split's documents (the model's own with ``code_entry_bytes``: network/codecs.py).

    .venv/bin/python bench/vocabulary_codes.py runs/mbc-vocab-named/last --documents 50 --show 4
"""

from __future__ import annotations

import argparse
import textwrap

import numpy as np
import torch

from mbc import data as qa_data
from mbc.model import MBCModel
from mbc.network.codecs import PrefixCode
from mbc.training.naming import naming_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="a MBC checkpoint folder trained with codebook=vocabulary")
    parser.add_argument("--data", default="generated")
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--documents", type=int, default=50, help="only the split's first N documents")
    parser.add_argument("--show", type=int, default=3, help="documents printed with their codes")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = MBCModel.from_pretrained(args.adapter).eval()
    if model.config.codebook != "vocabulary":
        raise SystemExit(f"{args.adapter} stores learned codes, not token ids (codebook={model.config.codebook!r})")
    splits = qa_data.load_splits(args.data)
    rows = qa_data.first_documents(splits[args.split], args.documents)
    texts = qa_data.documents(rows)
    tokenizer = model.llm.tokenizer
    codes = model.codec.token_ids(model.compress(texts))
    answers = naming_targets(tokenizer, rows, num_slots=10**6, max_tokens=model.config.max_document_tokens)
    absent = named = total = 0
    for text, row in zip(texts, codes):
        own = set(tokenizer(text, add_special_tokens=False)["input_ids"])
        absent += sum(code not in own for code in row)
        named += sum(code in set(answers.get(text, [])) for code in row)
        total += len(row)
    distinct = len({code for row in codes for code in row})
    print(
        f"{args.adapter}, {args.data} {args.split}, {len(texts)} documents, {model.config.num_slots} codes each: "
        f"{100 * absent / total:.1f}% name a token the document does not contain, "
        f"{100 * named / total:.1f}% one of its answer tokens; {distinct} distinct tokens in {total} codes"
    )
    print(coded_sizes(model, codes, qa_data.documents(splits["train"])))
    for text, row in list(zip(texts, codes))[: args.show]:
        print("\ndocument:", textwrap.shorten(text, 300))
        print("codes:   ", [tokenizer.decode([code]) for code in row])


def coded_sizes(model: MBCModel, codes: list[list[int]], train_texts: list[str]) -> str:
    """What the codes take under a prefix code: the model's own (what fits its entries), or one
    fitted here on the training documents (what entries of K codes would need)."""
    prefix_code, fitted_on = model.prefix_code, "the model's own prefix code (fitted in its training)"
    if prefix_code is None:
        prefix_code = PrefixCode(len(model.llm.tokenizer))
        prefix_code.fit(model.llm_token_ids(train_texts))
        fitted_on = f"a prefix code fitted here on {len(train_texts)} training documents"
    coder = prefix_code.coder()
    needed = np.array([(coder.bits(row) + 7) // 8 for row in codes])
    line = (
        f"under {fitted_on}: entries of these codes "
        f"need {needed.mean():.1f} bytes on average (p90 {np.percentile(needed, 90):.0f}, most {needed.max()}), "
        f"{8 * needed.sum() / sum(map(len, codes)):.1f} bits a code"
    )
    if model.prefix_code is not None:
        kept, slots = np.array([len(row) for row in codes]), model.config.num_slots
        line += (
            f"; stored in {model.config.code_entry_bytes} bytes: {kept.mean():.1f} of {slots} codes kept "
            f"on average, all of them for {100 * (kept == slots).mean():.0f}% of entries"
        )
    return line


if __name__ == "__main__":
    main()

"""What a token memory with written codes stores: a few documents' codes decoded as text beside the
tokens they were written from, and over a split how many codes moved off their kept token and how
many name no token of their document.

    .venv/bin/python bench/written_codes.py runs/written-squad-k48 \
        --data ../shared/data/squad/squad-v1.1-dev-open.json --split validation --show 3
"""

from __future__ import annotations

import argparse
import textwrap

import torch

from mbc import data as qa_data
from mbc.token_memory import TokenMemory
from mbc.training.vocabulary_codes import kept_inputs, written_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("memory", help="a token memory folder saved with codes='written'")
    parser.add_argument("--data", default="generated")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--documents", type=int, default=None, help="only the split's first N documents")
    parser.add_argument("--show", type=int, default=3, help="documents printed with their codes")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = TokenMemory.from_pretrained(args.memory)
    rows = qa_data.first_documents(qa_data.load_splits(args.data)[args.split], args.documents)
    texts = qa_data.documents(rows)
    kept = kept_inputs(model, texts)
    share = written_share(model, kept)
    print(
        f"{args.memory}, {args.data} {args.split}, {len(texts)} documents, {model.config.keep} codes each: "
        f"{100 * share['moved']:.1f}% of codes are not the kept token at their place, "
        f"{100 * share['not_in_document']:.1f}% name no token of their document"
    )
    for text in texts[: args.show]:
        document = kept[text]
        codes = model.codebook.lookup(model.write(document.ids, document.features)).cpu().tolist()
        print("\ndocument:", textwrap.shorten(text, 300))
        print("kept tokens:  ", repr(model.llm.tokenizer.decode(document.ids.tolist())))
        print("written codes:", repr(model.llm.tokenizer.decode(codes)))


if __name__ == "__main__":
    main()

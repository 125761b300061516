"""A memory the LLM reads as it is: each document kept as K of its own token ids.

The lever "a codebook the LLM can already read" at its simplest: the codebook is the LLM's own
token embedding table (49,152 entries: 16 bits an index), and the memory enters input-side, as the
context of the base LLM's worked-example prompt (`context_prompt`, what the gold-document baseline
reads). Which K tokens a document keeps is learned: a linear scorer on the frozen LLM's hidden
states (a token's and its successor's), trained on the training documents to find the tokens that
answer one of their questions. The bank stores the kept ids in document order and the cpu preset's
32-byte retrieval key; a question reads its top-1 document's kept tokens. The control: the same
with a bank of as many unrelated training documents. Nothing of MBC's trained adapter is used.

    .venv/bin/python bench/token_memory.py [--data generated] [--keep 8,16,24,32] [--documents 50] [--before 0]

Each K, and every token kept ("all": the document's whole token sequence), scored on the
validation split (choose K there; the test split is for final models): EM / F1 (by answer kind
on generated documents) with the right bank and with the unrelated one, the keys' recall, bytes
per document (2 per kept token + the key). Writes runs/token_memory/<data>[-beforeN].json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
LAYER = 20  # the hidden state the scorer reads (of SmolLM2's 30 layers)


def token_features(model, texts: list[str], batch: int = 16) -> list[tuple[list[int], list, torch.Tensor]]:
    """Per text: its LLM token ids, their character spans, and [tokens, 2 x hidden] features (each
    token's hidden state entering layer LAYER beside its successor's: the causal LLM sees no right
    context). Texts of similar length run together, padded on the right (which causal attention
    keeps from every real token)."""
    from mbc.model import pad
    from mbc.network.frozen_llm import lower_hidden
    from mbc.network.lora import lora_disabled

    encoded = [model.tokenizer(text, return_offsets_mapping=True) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]["input_ids"]))
    out: list = [None] * len(texts)
    with torch.no_grad(), lora_disabled(model.llm):
        for first in tqdm(range(0, len(order), batch), desc="LLM hidden states", unit="batch", leave=False):
            members = order[first : first + batch]
            ids = [encoded[i]["input_ids"] for i in members]
            mask = pad([[1] * len(t) for t in ids], 0, side="right")
            hidden = lower_hidden(model.llm, model.layout, pad(ids, 0, side="right"), mask, LAYER)
            for row, i in enumerate(members):
                states = hidden[row, : len(ids[row])]
                following = torch.cat([states[1:], states.new_zeros(1, states.shape[1])])
                out[i] = (ids[row], encoded[i]["offset_mapping"], torch.cat([states, following], dim=1))
    return out


def answer_labels(text: str, spans, answers: set[str], before: int = 0) -> torch.Tensor:
    """1 for each token whose characters overlap an occurrence of one of ``answers`` in ``text``,
    and for the ``before`` tokens ahead of each such run (the words that say what the answer is)."""
    covered = [False] * len(text)
    for answer in answers:
        for found in re.finditer(re.escape(answer), text):
            covered[found.start() : found.end()] = [True] * (found.end() - found.start())
    labels = [float(any(covered[start:end])) for start, end in spans]
    for i in [i for i, label in enumerate(labels) if label and (i == 0 or not labels[i - 1])]:
        for j in range(max(i - before, 0), i):
            labels[j] = 1.0
    return torch.tensor(labels)


def train_scorer(features: torch.Tensor, labels: torch.Tensor, steps: int = 600) -> nn.Linear:
    """A linear token scorer, trained with BCE weighted so that both classes count alike."""
    torch.manual_seed(0)
    scorer = nn.Linear(features.shape[1], 1)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-3, weight_decay=0.01)
    positive = labels.mean().clamp(1e-3, 1 - 1e-3)
    loss_of = nn.BCEWithLogitsLoss(pos_weight=(1 - positive) / positive)
    mean, std = features.mean(0), features.std(0) + 1e-5
    for _ in range(steps):
        batch = torch.randint(0, len(features), (4096,))
        loss = loss_of(scorer((features[batch] - mean) / std).squeeze(1), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Fold the normalisation into the layer: score = w . (x - mean) / std + b
    with torch.no_grad():
        weight = scorer.weight / std
        scorer.bias -= (weight * mean).sum()
        scorer.weight.copy_(weight)
    return scorer


def kept_ids(scorer: nn.Linear, tokens, keep: int) -> list[int]:
    """The ``keep`` best-scored token ids of one document, in document order (all when shorter)."""
    ids, _, features = tokens
    if keep >= len(ids):
        return list(ids)
    with torch.no_grad():
        best = scorer(features).squeeze(1).topk(keep).indices.sort().values
    return [ids[i] for i in best.tolist()]


def answer_with(model, rows, memory: dict[str, str], keys, stream: list[str]) -> tuple[list[str], float]:
    """Each row answered by the base LLM reading its top-1 document's memory text; and the keys'
    recall of the row's own document (percent)."""
    from mbc.evaluation.baselines import context_prompt
    from mbc.evaluation.online import _PromptAnswers  # one document's prompts batched together: a shared start
    from mbc.network.decoding import DecodingConfig

    chosen = model.top_documents([r.question for r in rows], keys)[:, 0].tolist()
    read = [stream[i] for i in chosen]
    prompts = [context_prompt(memory[document], row.question) for document, row in zip(read, rows)]
    predictions, _ = _PromptAnswers(model, DecodingConfig())(prompts, "answer", 16, groups=read)
    recall = 100 * sum(d == r.document for d, r in zip(read, rows)) / max(len(rows), 1)
    return predictions, recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="generated")
    parser.add_argument("--keep", default="8,16,24,32", help="tokens kept per document, comma-separated")
    parser.add_argument("--documents", type=int, default=50, help="validation documents streamed")
    parser.add_argument(
        "--before", type=int, default=0, help="also train the scorer to keep N tokens ahead of an answer"
    )
    args = parser.parse_args()

    from frontier import text_sizes  # bench/, beside this script

    from mbc import MBCConfig, MBCModel
    from mbc import data as qa_data
    from mbc.data.generated import answer_kinds
    from mbc.evaluation.metrics import score, score_by_group
    from mbc.training.presets import preset

    start = time.perf_counter()
    splits = qa_data.load_splits(args.data)
    train_rows = splits["train"]
    rows = qa_data.first_documents(splits["validation"], args.documents)
    train_docs, stream = qa_data.documents(train_rows), qa_data.documents(rows)
    unrelated = train_docs[: len(stream)]
    model = MBCModel.build(MBCConfig(**preset("cpu")["model"])).eval()
    model.fit_retrieval_keys(train_docs)  # as training does, before its first step
    print(f"retrieval keys fitted, {time.perf_counter() - start:.0f} s", flush=True)

    answers_of: dict[str, set[str]] = {}
    for row in train_rows:
        answers_of.setdefault(row.document, set()).update(row.answers)
    train_tokens = token_features(model, train_docs)
    features = torch.cat([f for _, _, f in train_tokens])
    labels = torch.cat(
        [answer_labels(d, s, answers_of[d], args.before) for d, (_, s, _) in zip(train_docs, train_tokens)]
    )
    scorer = train_scorer(features, labels)
    print(f"scorer trained, {time.perf_counter() - start:.0f} s", flush=True)
    tokens = dict(zip(stream + unrelated, token_features(model, stream + unrelated)))
    print(
        f"{len(train_docs)} training documents, {len(labels):,} tokens, {100 * labels.mean():.1f}% in an answer; "
        f"{len(rows)} validation questions about {len(stream)} documents",
        flush=True,
    )

    golds, kinds = [list(r.answers) for r in rows], answer_kinds(rows)
    own_keys, unrelated_keys = model.retrieval_keys_of(stream), model.retrieval_keys_of(unrelated)
    key_bytes = model.bytes_per_document()["retrieval_key"]
    results = []
    for keep in [int(k) for k in args.keep.split(",")] + [10**6]:
        memory = {d: model.tokenizer.decode(kept_ids(scorer, tokens[d], keep)) for d in stream + unrelated}
        own, recall = answer_with(model, rows, memory, own_keys, stream)
        control, _ = answer_with(model, rows, memory, unrelated_keys, unrelated)
        stored = sum(2 * min(keep, len(tokens[d][0])) for d in stream) / len(stream)  # uint16 ids
        result = {
            "keep": keep if keep < 10**6 else "all",
            "bytes": stored + key_bytes,
            **{k: v for k, v in score(own, golds).items() if k != "lenient_em"},
            **{f"control_{k}": v for k, v in score(control, golds).items() if k != "lenient_em"},
            "recall": recall,
            "by_kind": score_by_group(own, golds, kinds) if kinds else None,
            "control_by_kind": score_by_group(control, golds, kinds) if kinds else None,
            "example": memory[stream[0]],
        }
        results.append(result)
        kind_text = ""
        if kinds:
            kind_text = "  " + "  ".join(
                f"{k} {result['by_kind'][k]['em']:.1f}/{result['control_by_kind'][k]['em']:.1f}"
                for k in sorted(result["by_kind"])
            )
        print(
            f"keep {str(result['keep']):>4}  {result['bytes']:6.0f} B  EM {result['em']:5.1f}  F1 {result['f1']:5.1f}  "
            f"unrelated EM {result['control_em']:5.1f}  F1 {result['control_f1']:5.1f}  recall {recall:5.1f}"
            f"{kind_text}",
            flush=True,
        )
    raw, zstd = text_sizes(stream)
    print(f"document text: {raw:.0f} bytes raw, {zstd:.0f} bytes zstd -19 (each document alone)")
    print(f"e.g. {stream[0]!r}\n  kept at {args.keep.split(',')[0]}: {results[0]['example']!r}")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.data).stem) + (f"-before{args.before}" if args.before else "")
    output = ROOT / "runs" / "token_memory" / f"{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = {"data": args.data, "before": args.before, "questions": len(rows), "results": results}
    summary["text_bytes"] = {"raw": raw, "zstd": zstd}
    output.write_text(json.dumps(summary, indent=1))
    print(f"{time.perf_counter() - start:.0f} s; written to {output}")


if __name__ == "__main__":
    main()

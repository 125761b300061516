"""Training written codes end to end: MBC's QA loss through codes in the LLM's own vocabulary.

A token memory with ``codes="written"`` (token_memory.py, network/vocabulary.py) keeps K tokens of
each document, as the fitted scorer chooses them, and writes each as a vector: its own embedding
plus a trained rewrite of its features, stored as the nearest token. Here the writer and the
base LLM's KV-LoRA (the reader) train together on the paper's loss for such a memory: each
training question asked after its own document's codes, the answer's negative log-likelihood,
plus the commitment term. The codes enter the prompt as their embeddings with the vectors'
gradients passed straight through, so every step runs the whole LLM forward and backward (the
frozen layers cannot be kept, as the reader alone keeps them: their input moves).

The warm start is in the writer's initial state: a rewrite of zero names each kept token itself,
so the first step reads the token memory's bank, and the reader starts where the token memory's
reader is. The scorer that chooses which tokens are kept stays as fitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mbc.errors import MBCError
from mbc.token_memory import TokenMemory
from mbc.training.adapters import AdapterRun, fingerprint_texts, kv_lora, train_adapters


@dataclass
class Kept:
    """What the writer reads of one document: its kept token ids [k], their features [k, 2 x hidden]
    (a shorter document keeps all), and every token id of the document."""

    ids: torch.Tensor
    features: torch.Tensor
    document_ids: frozenset[int]


def kept_inputs(model: TokenMemory, texts: list[str]) -> dict[str, Kept]:
    return kept_from_features(model, dict(zip(texts, model.token_features(texts, progress=True))))


def kept_from_features(model: TokenMemory, tokens: dict) -> dict[str, Kept]:
    """``Kept`` of each document from its ``token_features`` (document -> ids, spans, features)."""
    kept = {}
    for text, (ids, _, features) in tokens.items():
        positions = model.keep_positions(ids, features)
        kept[text] = Kept(torch.tensor([ids[i] for i in positions]), features[positions].clone(), frozenset(ids))
    return kept


def train_codes(
    model: TokenMemory,
    rows,
    steps: int,
    run: AdapterRun | None = None,
    kept: dict[str, Kept] | None = None,
    fitted_with: dict | None = None,
) -> list[float]:
    """Train the writer and the KV-LoRA ``steps`` batches of ``rows`` (QAExample) on the QA loss
    plus commitment, the writer at ``run.writer_learning_rate``; saved and continued as
    ``train_adapters`` says. ``kept``: ``kept_inputs`` of the rows' documents, where the caller has
    them; ``fitted_with``: how the memory was fitted, recorded so that a continued run is the same run.
    Returns every step's loss."""
    from mbc.data import documents as distinct_documents

    if model.writer is None:
        raise MBCError(
            "only a token memory with codes='written' has codes to train; this one keeps its tokens as they are"
        )
    run = run or AdapterRun()
    llm = model.llm
    kept = kept if kept is not None else kept_inputs(model, distinct_documents(rows))
    examples = [(r.document, *model.prompt_around(r.question), llm.answer_ids(r.answers[0])) for r in rows]

    def batch_loss(batch) -> torch.Tensor:
        documents = [kept[document] for document, *_ in batch]
        vectors = model.write(torch.cat([d.ids for d in documents]), torch.cat([d.features for d in documents]))
        codes = model.codebook(vectors)
        written = codes.embeddings.split([len(d.ids) for d in documents])
        befores, afters, answers = ([row[i] for row in batch] for i in (1, 2, 3))
        return llm.loss_around(list(written), befores, afters, answers) + codes.commitment

    read = fingerprint_texts(str(kept[r.document].ids.tolist()) + "\n" + r.question for r in rows)
    settings = {"fitted_with": fitted_with or {}, "kept": read, "writer_learning_rate": run.writer_learning_rate}
    parameters = [
        {"params": list(model.writer.parameters()), "lr": run.writer_learning_rate},
        {"params": kv_lora(model)},
    ]
    return train_adapters(model, parameters, examples, batch_loss, steps, run, settings, "codes")


@torch.no_grad()
def written_share(model: TokenMemory, kept: dict[str, Kept]) -> dict[str, float]:
    """How far the codes moved from the kept tokens: the share of codes that are not the kept token
    at their place, and of codes that are no token of their document at all."""
    moved = absent = total = 0
    for document in kept.values():
        codes = model.codebook.lookup(model.write(document.ids, document.features)).cpu()
        moved += int((codes != document.ids).sum())
        absent += sum(1 for c in codes.tolist() if c not in document.document_ids)
        total += len(codes)
    return {"moved": moved / max(total, 1), "not_in_document": absent / max(total, 1)}

"""Answering a set of questions from a bank of documents, and scoring the answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mbc.bank import BankLayout, MemoryBank
from mbc.data import QAExample, documents
from mbc.data.generated import answer_kinds
from mbc.evaluation.metrics import score, score_by_group
from mbc.memory.ingest import ingest
from mbc.memory.protocol import Memory
from mbc.memory.readers import Reader, RetrievalReader, reader_for
from mbc.model import MBCModel
from mbc.network.decoding import DecodingConfig


@dataclass
class Evaluation:
    metrics: dict[str, float]  # em, f1, lenient_em (percent), loss; generated data: em_KIND, f1_KIND per answer kind
    predictions: list[str]


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def reader_over(model: Memory, texts: list[str], batch_size: int = 16) -> Reader:
    """A bank in memory holding ``texts`` (compressed as ``ingest`` stores them), and the reader
    that answers from it as a bank on disk would be read: by retrieval keys when the model has them,
    else attention over every stored vector (the method's definition)."""
    bank = MemoryBank.in_memory(BankLayout.of(model))
    ingest(model, bank, texts, batch_size=batch_size)
    return reader_for(model, bank, "retrieval" if model.retrieval_keys is not None else "full")


@torch.no_grad()
def evaluate(
    model: MBCModel,
    examples: list[QAExample],
    bank_documents: list[str] | None = None,
    batch_size: int = 16,
    decoding: DecodingConfig | None = None,
) -> Evaluation:
    """Bank = every distinct document of ``examples`` (or ``bank_documents``); each question is
    answered from the whole bank and scored; ``loss`` is the teacher-forced QA loss on the answers."""
    was_training = model.training
    model.eval()
    reader = reader_over(model, bank_documents if bank_documents is not None else documents(examples), batch_size)
    predictions, losses = [], []
    for chunk in chunks(examples, batch_size):
        answers, loss, _ = model.answer_and_loss(
            reader, [e.question for e in chunk], [e.answers[0] for e in chunk], decoding
        )
        losses.append(loss.item() * len(chunk))
        predictions += answers
    reader.bank.close()
    model.train(was_training)
    return Evaluation({**scores(predictions, examples), "loss": sum(losses) / max(len(examples), 1)}, predictions)


def scores(predictions: list[str], examples: list[QAExample]) -> dict[str, float]:
    """EM, F1 and lenient EM, and on generated data ``em_KIND`` and ``f1_KIND`` for each answer kind
    (mbc.data.generated.answer_kind: what a compressed memory can carry differs by kind)."""
    golds = [list(e.answers) for e in examples]
    metrics = score(predictions, golds)
    kinds = answer_kinds(examples)
    if kinds is not None:
        by_kind = score_by_group(predictions, golds, kinds)
        metrics.update(
            {f"{metric}_{kind}": values[metric] for kind, values in by_kind.items() for metric in ("em", "f1")}
        )
    return metrics


@torch.no_grad()
def retrieval_recall(
    reader: RetrievalReader, examples: list[QAExample], bank_id: dict[str, int], batch_size: int = 16
) -> float:
    """Percent of questions whose own document (``bank_id[document]``) is among those the reader's
    retrieval keys choose."""
    found = 0
    for chunk in chunks(examples, batch_size):
        found += sum(bank_id[e.document] in top for e, top in zip(chunk, reader.top_ids([e.question for e in chunk])))
    return 100 * found / max(len(examples), 1)

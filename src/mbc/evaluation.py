"""Answering a set of questions from a bank of documents, and scoring the answers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import QAExample, documents
from .decoding import DecodingConfig
from .errors import MBCError
from .generated import answer_kinds
from .metrics import score, score_by_group
from .model import MBCModel


@dataclass
class Evaluation:
    metrics: dict[str, float]  # em, f1, lenient_em (percent), loss; generated data: em_KIND, f1_KIND per answer kind
    predictions: list[str]


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def build_bank(model: MBCModel, texts: list[str], batch_size: int = 16) -> np.ndarray:
    return np.concatenate([model.compress(chunk) for chunk in chunks(texts, batch_size)])


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
    texts = bank_documents if bank_documents is not None else documents(examples)
    memory = model.memory(build_bank(model, texts, batch_size))
    keys = model.retrieval_keys_of(texts) if model.retrieval_keys is not None else None
    predictions, losses = [], []
    for chunk in chunks(examples, batch_size):
        questions = [e.question for e in chunk]
        prefix = model.prefix(model.modulation(questions, memory, document_keys=keys))  # once, for both the loss and the answers
        losses.append(model.qa_loss(questions, [e.answers[0] for e in chunk], prefix).item() * len(chunk))
        predictions += model.generate_answers(questions, prefix, decoding)
    model.train(was_training)
    return Evaluation({**scores(predictions, examples), "loss": sum(losses) / max(len(examples), 1)}, predictions)


def scores(predictions: list[str], examples: list[QAExample]) -> dict[str, float]:
    """EM, F1 and lenient EM, and on generated data ``em_KIND`` and ``f1_KIND`` for each answer kind
    (mbc.generated.answer_kind: what a compressed memory can carry differs by kind)."""
    golds = [list(e.answers) for e in examples]
    metrics = score(predictions, golds)
    kinds = answer_kinds(examples)
    if kinds is not None:
        by_kind = score_by_group(predictions, golds, kinds)
        metrics.update({f"{metric}_{kind}": values[metric] for kind, values in by_kind.items() for metric in ("em", "f1")})
    return metrics


@torch.no_grad()
def retrieval_recall(model: MBCModel, examples: list[QAExample], bank_documents: list[str], batch_size: int = 16) -> float:
    """Percent of questions whose own document is among the top-k that the model's retrieval keys
    pick from a bank of ``bank_documents`` (a model with ``retrieval_top_k`` > 0)."""
    if model.retrieval_keys is None:
        raise MBCError("retrieval_recall needs a model with retrieval_top_k > 0")
    keys = model.retrieval_keys_of(bank_documents)
    found = 0
    for chunk in chunks(examples, batch_size):
        top = model.top_documents([e.question for e in chunk], keys).tolist()
        found += sum(e.document in {bank_documents[i] for i in row} for e, row in zip(chunk, top))
    return 100 * found / max(len(examples), 1)


FEW_SHOT_TEMPLATE = (
    "Question: What is the capital of France?\nAnswer: Paris\n\n"
    "Question: In what year did the Second World War end?\nAnswer: 1945\n\n"
    "Question: Who wrote the play Hamlet?\nAnswer: William Shakespeare\n\n"
    "Question: {question}\nAnswer:"
)


@torch.no_grad()
def evaluate_base_llm(model: MBCModel, examples: list[QAExample], prompt_template: str | None = None,
                      batch_size: int = 16, decoding: DecodingConfig | None = None) -> Evaluation:
    """The base LLM with no adaptation: the raw question (``prompt_template=None``: the model's own
    template), or a short-answer prompt such as ``FEW_SHOT_TEMPLATE``."""
    predictions = []
    for chunk in chunks(examples, batch_size):
        predictions += model.answer_without_memory([e.question for e in chunk], prompt_template, decoding)
    return Evaluation(scores(predictions, examples), predictions)

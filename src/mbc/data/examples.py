"""A question-answering row, and how rows are grouped and split.

Splits are made by group (article, document), never by question, so no document's text is seen
on both sides of a split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mbc.errors import MBCError


@dataclass(frozen=True)
class QAExample:
    document: str
    question: str
    answers: tuple[str, ...]
    group: str  # article / document group: the unit of splitting
    source: str = ""  # "file:row", for messages


def documents(examples: list[QAExample]) -> list[str]:
    """The distinct documents, in order of first appearance."""
    return list(dict.fromkeys(e.document for e in examples))


def first_documents(examples: list[QAExample], count: int | None) -> list[QAExample]:
    """Keep every question about the first ``count`` distinct documents (the reference's down-sampling)."""
    if count is None:
        return examples
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise MBCError(f"the number of documents to keep must be a whole number of at least 1, got {count!r}")
    kept = set(documents(examples)[:count])
    return [e for e in examples if e.document in kept]


def split_by_group(examples: list[QAExample], fractions: dict[str, float], seed: int = 0) -> dict[str, list[QAExample]]:
    """Shuffle the groups (articles) with ``seed`` and cut them by ``fractions`` (which sum to 1)."""
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise MBCError(f"split fractions must sum to 1, got {fractions}")
    groups = list(dict.fromkeys(e.group for e in examples))
    random.Random(seed).shuffle(groups)
    splits, start = {}, 0
    for i, (name, fraction) in enumerate(fractions.items()):
        end = len(groups) if i == len(fractions) - 1 else start + round(fraction * len(groups))
        chosen = set(groups[start:end])
        splits[name] = [e for e in examples if e.group in chosen]
        start = end
    return splits


STANDARD_SPLIT = {"train": 0.7, "validation": 0.1, "test": 0.2}


def standard_split(examples: list[QAExample], seed: int = 0) -> dict[str, list[QAExample]]:
    """The project's split by group: 70% train, 10% validation, 20% test (issues 3 and 4 share it)."""
    return split_by_group(examples, STANDARD_SPLIT, seed)

"""Answer scoring as in SQuAD v1.1's official script, plus the reference's lenient EM.

Normalisation: lowercase, strip punctuation, the articles a/an/the and extra whitespace. EM and F1
take the best over the gold answers. The reference implementation's EM instead cuts the
prediction to the length of the (normalised) shortest gold answer before comparing, which credits
an answer that starts right and runs on ("1987 in the north" for "1987").
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    return float(any(normalize(prediction) == normalize(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: list[str]) -> float:
    return max(_f1(prediction, g) for g in golds)


def lenient_exact_match(prediction: str, golds: list[str]) -> float:
    gold = normalize(min(golds, key=len))
    return float(normalize(prediction)[: len(gold)] == gold)


def retention_percent(f1: float, first_f1: float) -> float | None:
    """F1 on the first documents' questions now, as a percent of their F1 when they were streamed;
    None where that first F1 was 0 (nothing to retain)."""
    return 100 * f1 / first_f1 if first_f1 else None


def score(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Mean EM, F1 and lenient EM in percent."""
    n = max(len(predictions), 1)
    return {
        "em": 100 * sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n,
        "f1": 100 * sum(f1_score(p, g) for p, g in zip(predictions, golds)) / n,
        "lenient_em": 100 * sum(lenient_exact_match(p, g) for p, g in zip(predictions, golds)) / n,
    }


def score_by_group(predictions: list[str], golds: list[list[str]], groups: list[str]) -> dict[str, dict[str, float]]:
    """``score`` over each group of questions separately (e.g. by answer kind), with its size; groups sorted by name."""
    result = {}
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        result[group] = {
            "questions": len(members),
            **score([predictions[i] for i in members], [golds[i] for i in members]),
        }
    return result

"""Naming: a warm start that teaches the amortization network to name tokens (not in the paper).

With the vocabulary as its codebook (``MBCConfig.codebook="vocabulary"``, network/vocabulary.py)
each of a document's K vectors is stored as a token id. Nothing in the QA loss says which tokens:
through the straight-through estimator it only moves each vector within reach of some token. This
objective tells the amortization network which ones a reader can use: slot k of a training
document is scored, over the whole vocabulary, against the k-th of the document's answer tokens in
document order (the tokens that overlap an answer to one of its training questions, and the
``before`` tokens ahead of each answer: the labels the token memory's scorer is fitted to,
training/token_memory.py). The vocabulary stage's own lookup score is the logit, so that a slot
that wins the cross-entropy is also stored as that token.

A document with fewer answer tokens than slots leaves the remaining slots free (no target), or, with
``fill``, gives them the document's tokens nearest to an answer (the context a reader needs around
it: the token memory reads ~40 kept tokens of a generated document where it reads almost nothing
from 24); one with more keeps the first K.

With the pointer's placement (network/pointer.py) the naming loss is ``placement_loss``:
the targets' places train its salience, so that the named tokens are the ones that get a slot of
their own. The ordered cross-entropy does not fit placed slots: each token the salience adds or
drops ahead of slot k shifts slot k's ordered target, and on SQuAD it stayed at ~11 nats over 100
steps (docs/JOURNAL.md, session 33). Each slot is named the token it is placed on instead
(``placed_tokens``): without that, the QA loss moved generated documents' slots off their tokens.
``fit_placement`` starts the salience where the token memory's scorer starts, a logistic
regression on the named places fitted before the first step: trained from zero alongside the
naming loss, it had not moved the naming loss after 70 steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mbc.network.frozen_llm import IGNORE, pad
from mbc.training.token_memory import answer_labels, fit_scorer


def naming_targets(
    tokenizer, rows, num_slots: int, before: int = 2, max_tokens: int = 512, fill: bool = False
) -> dict[str, list[int]]:
    """Per training document (``QAExample`` rows): the LLM token ids of its first ``num_slots``
    answer tokens (with ``fill``, up to ``num_slots`` tokens nearest to one), in document order."""
    return {text: ids for text, (ids, _) in named_tokens(tokenizer, rows, num_slots, before, max_tokens, fill).items()}


def named_tokens(
    tokenizer, rows, num_slots: int, before: int = 2, max_tokens: int = 512, fill: bool = False
) -> dict[str, tuple[list[int], list[int]]]:
    """``naming_targets`` with their places: per document, (token ids, their positions in its LLM
    tokenization)."""
    answers_of: dict[str, set[str]] = {}
    for row in rows:
        answers_of.setdefault(row.document, set()).update(row.answers)
    targets = {}
    for text, answers in answers_of.items():
        encoded = tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=max_tokens, return_offsets_mapping=True
        )
        labels = answer_labels(text, encoded["offset_mapping"], answers, before).tolist()
        kept = nearest_to_labels(labels, num_slots) if fill else [i for i, label in enumerate(labels) if label]
        kept = kept[:num_slots]
        targets[text] = ([encoded["input_ids"][i] for i in kept], kept)
    return targets


def nearest_to_labels(labels: list[float], count: int) -> list[int]:
    """The positions of the ``count`` tokens nearest to a labelled one (the labelled ones first,
    then by distance, then by position), in document order; without labels, the first ones."""
    marked = [i for i, label in enumerate(labels) if label]
    distance = [min((abs(i - m) for m in marked), default=i) for i in range(len(labels))]
    return sorted(sorted(range(len(labels)), key=lambda i: (distance[i], i))[:count])


def naming_loss(stage, contexts: torch.Tensor, targets: list[list[int]], temperature: float) -> torch.Tensor:
    """Cross-entropy of each document's slot k [N, K, dim] against its k-th target token, under the
    vocabulary stage's lookup scores divided by ``temperature``."""
    labels = pad([t[: contexts.shape[1]] for t in targets], IGNORE).to(contexts.device)
    if labels.numel() == 0 or (labels == IGNORE).all():
        return contexts.sum() * 0.0
    named = contexts[:, : labels.shape[1]]
    scores = stage.scores(named.flatten(0, 1)) / temperature
    return F.cross_entropy(scores, labels.flatten(), ignore_index=IGNORE)


def placement_loss(pointer, hidden: torch.Tensor, mask: torch.Tensor, places: list[list[int]]) -> torch.Tensor:
    """The pointer's salience [N, T] fitted to flag each document's named tokens (``places``), a
    logistic regression with both classes weighted alike, as the token memory's scorer is fitted."""
    logits = pointer.token_salience(hidden)
    labels = torch.stack([place_flags(kept, logits.shape[1]) for kept in places]).to(logits)
    counted = mask.bool() & labels.any(dim=1, keepdim=True)  # documents without targets are left out
    if not counted.any():
        return logits.sum() * 0.0
    positive = labels[counted].mean().clamp(1e-3, 1 - 1e-3)
    return F.binary_cross_entropy_with_logits(logits[counted], labels[counted], pos_weight=(1 - positive) / positive)


def fit_placement(pointer, pointer_states, places: dict[str, list[int]], batch_size: int = 16) -> None:
    """The pointer's salience fitted to flag each training document's named tokens (``places``),
    over the hidden states ``pointer_states(texts)`` gives (``MBCModel.pointer_states``)."""
    texts = [text for text, kept in places.items() if kept]
    features, labels = [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc="placement", unit="batch"):
            chunk = texts[start : start + batch_size]
            states = pointer_states(chunk)
            normed = pointer.normed(states.hidden)
            for row, text in enumerate(chunk):
                length = int(states.mask[row].sum())
                features.append(normed[row, :length].float())
                labels.append(place_flags(places[text], length))
    fit_scorer(pointer.salience, torch.cat(features), torch.cat(labels))


def place_flags(places: list[int], length: int) -> torch.Tensor:
    """[length]: 1 at each named token's position, 0 elsewhere (positions past ``length`` dropped)."""
    flags = torch.zeros(length)
    flags[[p for p in places if p < length]] = 1.0
    return flags


def placed_tokens(pointer, states, num_slots: int) -> list[list[int]]:
    """Per document, the token id each slot is placed on (the placement's peak; network/pointer.py)."""
    with torch.no_grad():
        prior = pointer.placement(pointer.token_salience(states.hidden), states.mask, num_slots, hard=pointer.copy)
        return states.ids.gather(1, prior.argmax(-1)).tolist()

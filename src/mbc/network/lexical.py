"""BM25 over token ids: which stored documents share a question's rarer tokens, at no stored byte.

A token memory stores each document as K of its own LLM token ids (token_memory.py); matched
against a question's token ids, those same entries are a lexical index. Okapi BM25 (Robertson and
Zaragoza 2009) with its usual k1 = 1.5 and b = 0.75; a term is a token id, so no word list or
stemmer is needed, and common tokens weigh little through their inverse document frequency over
the bank. ``combined`` adds it to the retrieval key's score, each standardised over the bank.
"""

from __future__ import annotations

import torch


def bm25(questions: list[list[int]], documents: torch.Tensor, pad: int, k1: float = 1.5, b: float = 0.75):
    """[Q, N] scores of each question's distinct token ids against each document's ids [N, K]
    (``pad`` marks no token)."""
    count = documents.shape[0]
    real = documents != pad
    if not real.any():
        return torch.zeros(len(questions), count)
    rows = torch.arange(count).unsqueeze(1).expand_as(documents)[real]
    terms, columns = torch.unique(documents[real], return_inverse=True)  # the bank's distinct tokens, sorted
    pairs, frequency = torch.unique(torch.stack([rows, columns]), dim=1, return_counts=True)
    frequency = frequency.float()
    documents_with = torch.bincount(pairs[1], minlength=len(terms)).float()
    idf = torch.log1p((count - documents_with + 0.5) / (documents_with + 0.5))
    length = real.sum(1).float()
    saturation = k1 * (1 - b + b * length / length.mean())
    weights = idf[pairs[1]] * frequency * (k1 + 1) / (frequency + saturation[pairs[0]])
    index = torch.sparse_coo_tensor(pairs, weights, (count, len(terms)), check_invariants=True)
    asked = torch.zeros(len(terms), len(questions))
    for column, ids in enumerate(questions):
        ids = torch.as_tensor(sorted(set(ids)), dtype=terms.dtype)
        at = torch.searchsorted(terms, ids).clamp(max=len(terms) - 1)
        asked[at[terms[at] == ids], column] = 1.0
    return torch.sparse.mm(index, asked).T


def lexical_rows(keys: torch.Tensor, entries: list[list[int]], width: int, pad: int) -> torch.Tensor:
    """[n, subspaces + width]: each stored document's retrieval key, then its token ids padded with
    ``pad`` to one ``width`` (a reader adds the rows of new documents to those it holds), the index
    ``bm25`` reads."""
    return torch.cat([torch.as_tensor(keys).long(), padded_ids(entries, width, pad)], dim=1)


def padded_ids(rows: list[list[int]], width: int, pad: int) -> torch.Tensor:
    """[n, width] token ids, each row's ids then ``pad`` (the documents ``bm25`` reads)."""
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for row, ids in enumerate(rows):
        tokens[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return tokens


def standardised(scores: torch.Tensor) -> torch.Tensor:
    """Each row [Q, N] to zero mean and unit deviation over the documents (all zeros for one document)."""
    centred = scores - scores.mean(1, keepdim=True)
    return centred / (centred.std(1, keepdim=True, correction=0) + 1e-9)


def combined(key_scores: torch.Tensor, lexical_scores: torch.Tensor, lexical_weight: float) -> torch.Tensor:
    """The retrieval key's scores plus ``lexical_weight`` times BM25's, each standardised over the bank."""
    if lexical_weight == 0:
        return key_scores
    return standardised(key_scores) + lexical_weight * standardised(lexical_scores.to(key_scores))

"""MBC's codebook step on the base LLM's own token table: vectors -> token ids -> input embeddings.

The learned codebook of the paper (network/codebook.py) gives codes that only the trained prefix
can read, and in CPU budgets it never learned to carry a name, a number or a SQuAD paragraph
(docs/RESULTS.md). Here the codebook is the frozen LLM's input embedding table: a code is a token
id (16 bits for SmolLM2's 49,152 tokens), and the LLM reads the codes where it reads any token,
input-side, from the first step.

``VocabularyCodebook`` looks vectors up by L2 (the paper's metric) and passes gradients straight
through (van den Oord et al. 2017), with the commitment term only: the codes are the LLM's, frozen,
so there is no codebook loss, and no dead-code reset (a token nobody chooses costs nothing; how many
distinct tokens a bank uses is reported instead).

``CodeWriter`` is the amortization network's last step for such codes: each vector a document
keeps (token_memory.py chooses which) starts from its own token's embedding plus a trained rewrite
of what the LLM's hidden states say about it, so the untrained writer names the document's own
tokens (the token memory's bank, a warm start that needs no steps) and training on the QA loss may
move a code to any token of the vocabulary, the document's or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizedTokens:
    ids: torch.Tensor  # [..., ] token ids, the stored codes
    embeddings: torch.Tensor  # [..., dim] the codes' input embeddings; straight-through to the vectors
    commitment: torch.Tensor  # beta x mean ||vector - sg(code embedding)||^2


class VocabularyCodebook:
    """Lookup against a frozen token table (the base LLM's input embeddings, held by the LLM, not here)."""

    def __init__(self, embeddings: nn.Embedding, beta: float = 0.25, chunk: int = 4096):
        self.embeddings, self.beta, self.chunk = embeddings, beta, chunk

    @property
    def table(self) -> torch.Tensor:
        return self.embeddings.weight

    @torch.no_grad()
    def lookup(self, vectors: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> the id of the nearest token embedding by L2, [...]. In chunks of vectors,
        since the distance table to 49,152 tokens is 200 KB a vector."""
        flat = vectors.reshape(-1, vectors.shape[-1]).to(self.table.dtype)
        table_sq = self.table.pow(2).sum(1)
        # ||v||^2 is the same for every token, so it is left out of the comparison.
        ids = [(table_sq - 2 * part @ self.table.T).argmin(1) for part in flat.split(self.chunk)]
        return torch.cat(ids).reshape(vectors.shape[:-1]) if ids else flat.new_zeros(vectors.shape[:-1]).long()

    def __call__(self, vectors: torch.Tensor) -> QuantizedTokens:
        ids = self.lookup(vectors)
        chosen = self.embeddings(ids).detach()
        straight_through = chosen + vectors - vectors.detach()
        commitment = self.beta * F.mse_loss(vectors, chosen) if vectors.numel() else vectors.sum()
        return QuantizedTokens(ids, straight_through, commitment)


class CodeWriter(nn.Module):
    """A kept token's features (token_memory.py: its hidden state beside its successor's) and its
    own input embedding -> the vector to quantize: the embedding + rewrite(features). The rewrite
    starts at zero, so that before training every code is the kept token itself."""

    def __init__(self, feature_dim: int, dim: int):
        super().__init__()
        # The LLM's hidden states run to norms of tens: standardised, a step of the rewrite moves a
        # code by about the same on every kind of token.
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False)
        self.rewrite = nn.Linear(feature_dim, dim)
        nn.init.zeros_(self.rewrite.weight)
        nn.init.zeros_(self.rewrite.bias)

    def forward(self, own: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """own [..., K, dim] (the kept tokens' embeddings), features [..., K, feature_dim] -> vectors [..., K, dim]."""
        return own.detach() + self.rewrite(self.norm(features.to(self.rewrite.weight.dtype)))

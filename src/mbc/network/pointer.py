"""A pointer from MBC's slots to the document's own tokens (not in the paper; ``code_pointer``).

With the vocabulary as its codebook (network/vocabulary.py) a slot that should keep a name must
come out of the amortization network as that name's token id. Generated from the encoder's summary
alone, it does not: trained to name each document's answer tokens, the network named common words
and the closed-list word but spelled no name or number ("1108" -> " 1 3 7"; docs/JOURNAL.md,
session 31). The token memory reads names because it keeps the document's own tokens. Here each
slot points: its vector (as a query) attends over the document's tokens in the LLM's tokenization,
keyed by what the frozen LLM's hidden states at one layer say of each token (where the token
memory's scorer tells answers apart), and takes the attention-weighted mix of those tokens' codes.
A learned residual, zero at the start, leaves every other token of the vocabulary within reach:

    slot_k' = sum_t softmax_t(q_k . key_t / sqrt(d)) * code(token_t) + residual(slot_k)

A peaked attention gives exactly a token of the document, which the vocabulary stage then stores.

With ``positions`` (``pointer_positions``) each key also gets a learned embedding of its token's
place in the document and each query one of its slot's number, both zero at the start: the
hidden states say what a token is better than where it is, and without them neighbouring slots
named the same token ("Keloux" -> " Kel oux oux oux"; docs/JOURNAL.md, session 32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenPointer(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, key_dim: int = 128, positions: tuple[int, int] | None = None):
        """``positions``: (slots, document tokens) for the learned place embeddings, or None."""
        super().__init__()
        self.query = nn.Linear(dim, key_dim)
        # The LLM's hidden states run to norms of tens: standardised before the key projection.
        self.key_norm = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.key = nn.Linear(hidden_dim, key_dim)
        self.slot_places = self.token_places = None
        if positions is not None:
            self.slot_places, self.token_places = (nn.Embedding(n, key_dim) for n in positions)
            nn.init.zeros_(self.slot_places.weight)
            nn.init.zeros_(self.token_places.weight)
        self.residual = nn.Linear(dim, dim)
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)

    def forward(
        self, slots: torch.Tensor, hidden: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """slots [N, K, dim], each document token's LLM hidden state [N, T, hidden_dim] and code
        vector [N, T, dim] (the vocabulary stage's ``decode`` of its id), mask [N, T] (1 = a token)
        -> the slots' new vectors [N, K, dim]."""
        return self.attention(slots, hidden, mask) @ codes.to(slots.dtype) + self.residual(slots)

    def attention(self, slots: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, K, T]: where each slot points, a distribution over the document's tokens."""
        keys = self.key(self.key_norm(hidden.to(self.key.weight.dtype)))
        queries = self.query(slots)
        if self.token_places is not None:
            keys = keys + self.token_places.weight[: keys.shape[1]]
            queries = queries + self.slot_places.weight[: queries.shape[1]]
        scores = queries @ keys.transpose(1, 2) / self.key.out_features**0.5
        return F.softmax(scores.masked_fill(~mask.bool()[:, None, :], float("-inf")), dim=-1)

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

With ``placement`` (``pointer_placement``) the slots are laid along the document by a learned
salience: each token gets a mass, a soft top-K of a linear score of its hidden state (the token
memory's scorer, token_memory.py), the masses are scaled to sum to K and laid end to end in
document order, and slot k may point only where the masses cover [k, k+1):

    attention_kt  proportional to  overlap(token t's stretch, [k, k+1)) * exp(q_k . key_t / sqrt(d))

A salient token covers a slot of its own; the tokens between salient ones share what is left. So
slot k points near the document's k-th salient token and the codes keep document order. Why: on
SQuAD's 150-256-token paragraphs a slot could not find "the k-th answer token" by content alone
(the naming loss stalled, the codes were commas; docs/JOURNAL.md, session 32). With the salience at
zero every token has the same mass: slot k reads the k-th K-th of the document.

With ``copy`` (``pointer_copy``) the placement is hard: the K most salient tokens get mass 1 and
the rest 0 (a straight-through estimate, the soft masses' gradient), so slot k covers exactly the
k-th of them, and there is no residual: each slot copies one token of the document. Why: soft
masses near the threshold split a slot between two tokens, and the vocabulary token nearest a mix
of two digits' codes is often a third digit; the residual, trained by the QA loss, moved one code
in eight to another token ("1963" stored as "1 9 7 3" where the pointer pointed at "6";
docs/JOURNAL.md, session 34).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenPointer(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        key_dim: int = 128,
        positions: tuple[int, int] | None = None,
        placement: bool = False,
        copy: bool = False,
    ):
        """``positions``: (slots, document tokens) for the learned place embeddings, or None;
        ``placement``: slots laid along the document by a learned salience; ``copy``: that placement
        hard and no residual, so each slot copies one document token."""
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
        self.salience = None
        if placement:
            self.salience = nn.Linear(hidden_dim, 1)
            nn.init.zeros_(self.salience.weight)
            nn.init.zeros_(self.salience.bias)
        self.copy = copy
        self.residual = None
        if not copy:
            self.residual = nn.Linear(dim, dim)
            nn.init.zeros_(self.residual.weight)
            nn.init.zeros_(self.residual.bias)

    def forward(
        self, slots: torch.Tensor, hidden: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """slots [N, K, dim], each document token's LLM hidden state [N, T, hidden_dim] and code
        vector [N, T, dim] (the vocabulary stage's ``decode`` of its id), mask [N, T] (1 = a token)
        -> the slots' new vectors [N, K, dim]."""
        pointed = self.attention(slots, hidden, mask) @ codes.to(slots.dtype)
        return pointed if self.residual is None else pointed + self.residual(slots)

    def attention(self, slots: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, K, T]: where each slot points, a distribution over the document's tokens."""
        normed = self.normed(hidden)
        keys = self.key(normed)
        queries = self.query(slots)
        if self.token_places is not None:
            keys = keys + self.token_places.weight[: keys.shape[1]]
            queries = queries + self.slot_places.weight[: queries.shape[1]]
        scores = queries @ keys.transpose(1, 2) / self.key.out_features**0.5
        if self.salience is not None:
            scores = scores + self.placement(self.token_salience(hidden, normed), mask, slots.shape[1], hard=self.copy)
        return F.softmax(scores.masked_fill(~mask.bool()[:, None, :], float("-inf")), dim=-1)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states as the key and the salience read them."""
        return self.key_norm(hidden.to(self.key.weight.dtype))

    def token_salience(self, hidden: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
        """[N, T] logits: how much each token deserves a slot of its own (with ``placement``);
        ``normed``: ``self.normed(hidden)``, where already made."""
        return self.salience(self.normed(hidden) if normed is None else normed).squeeze(-1)

    @staticmethod
    def placement(
        salience: torch.Tensor, mask: torch.Tensor, num_slots: int, sharpness: float = 10.0, hard: bool = False
    ) -> torch.Tensor:
        """[N, K, T]: log of the share of slot k's stretch [k, k+1) that token t's mass covers.
        The masses: sigmoid(sharpness * (salience - the threshold between its K-th and K+1-th
        largest) / their spread about it), a soft top-K (threshold and spread held fixed), scaled to
        sum to K. ``hard``: 1 for the K most salient tokens (all of a shorter document's), 0 for the
        rest, with the soft masses' gradient; a document of fewer than K tokens leaves the last
        slots uncovered."""
        mask = mask.to(salience.dtype)
        ranked = salience.detach().masked_fill(mask == 0, float("-inf")).sort(dim=1, descending=True).values
        count = mask.sum(dim=1, keepdim=True).long()
        last_kept = ranked.gather(1, (count.clamp(max=num_slots) - 1).clamp_min(0))
        first_left = ranked.gather(1, count.clamp(max=num_slots).clamp(max=ranked.shape[1] - 1))
        # K tokens or fewer: all of them kept
        threshold = torch.where(count > num_slots, (last_kept + first_left) / 2, last_kept - 1.0)
        spread = ((salience.detach() - threshold) * mask).pow(2).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        # sharp: a logistic fit ranks well but its logits are mild; at their own scale nearly every
        # token would keep a tenth of a slot and blur where the salient ones lie
        mass = torch.sigmoid(sharpness * (salience - threshold) / spread.sqrt().clamp_min(1e-6)) * mask
        if hard:  # ranks, not the threshold: ties (a salience not yet fitted) still keep K tokens
            order = salience.detach().masked_fill(mask == 0, float("-inf")).argsort(dim=1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
            )
            kept = (rank < num_slots).to(mass) * mask
            mass = kept + mass - mass.detach()
        else:
            mass = mass * num_slots / mass.sum(dim=1, keepdim=True).clamp_min(1e-6)
        end = mass.cumsum(dim=1)
        start = end - mass
        stretch = torch.arange(num_slots, device=salience.device, dtype=salience.dtype)[None, :, None]
        overlap = (torch.minimum(end[:, None, :], stretch + 1) - torch.maximum(start[:, None, :], stretch)).clamp_min(0)
        return torch.log(overlap + 1e-4)

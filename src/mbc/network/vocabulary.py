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

``VocabularyStage`` is the same codebook inside MBC itself (``MBCConfig.codebook="vocabulary"``):
the first stage of its ``ResidualQuantizer`` (network/codebook.py), so that the amortization
network's K vectors are stored as K token ids and read by the paper's path (aggregation -> prefix),
with learned residual stages after it where ``codebook_stages`` > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mbc.network.codebook import QuantizerOutput, perplexity


@torch.no_grad()
def nearest_rows(
    vectors: torch.Tensor, table: torch.Tensor, row_norms: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """[..., dim] -> [...]: for each vector v the row e of ``table`` with the least
    ``row_norms[e] - 2 v.e`` (the L2 nearest row when ``row_norms`` are the rows' squared norms:
    ||v||^2 is the same for every row, so it is left out). In chunks of vectors, since the distance
    table to 49,152 tokens is 200 KB a vector."""
    flat = vectors.reshape(-1, vectors.shape[-1]).to(table.dtype)
    ids = [(row_norms - 2 * part @ table.T).argmin(1) for part in flat.split(chunk)]
    return torch.cat(ids).reshape(vectors.shape[:-1]) if ids else flat.new_zeros(vectors.shape[:-1]).long()


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
        """[..., dim] -> the id of the nearest token embedding by L2, [...]."""
        return nearest_rows(vectors, self.table, self.table.pow(2).sum(1), chunk=self.chunk)

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


class VocabularyStage(nn.Module):
    """A codebook stage whose codes are the frozen LLM's input embeddings, standardized: the token
    table minus its mean row, divided by its root-mean-square deviation (one scalar, as SlotNorm
    does for the amortization network's vectors, network/amortization.py), so that vectors and
    codes live at the same scale. A fixed affine map of the table: nothing here trains.
    ``metric="cosine"`` looks tokens up by direction instead, as the learned codebook's cosine
    metric does (network/codebook.py, where L2 lookup let a few central codes take every vector):
    vectors and standardized rows both at norm sqrt(dim).

    The interface of one ``VectorQuantizer`` stage (network/codebook.py). The table is the LLM's
    and is not part of this module's state (a checkpoint would otherwise carry 28M frozen numbers).
    In place of the dead-code reset, which has no meaning for a frozen vocabulary (a token no vector
    chooses costs nothing), ``fraction_alive`` reports how many of the last batch's vectors chose
    distinct tokens: 1 is every vector its own token, a small share is a collapse onto a few."""

    def __init__(self, embeddings: nn.Embedding, beta: float = 0.25, metric: str = "l2", chunk: int = 4096):
        super().__init__()
        object.__setattr__(self, "embeddings", embeddings)  # held, not owned (see above)
        self.beta, self.metric, self.chunk = beta, metric, chunk
        self.dim = embeddings.embedding_dim
        table = embeddings.weight.detach().float()
        mean = table.mean(0)
        centred_norms = (table - mean).norm(dim=1).clamp(min=1e-12)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("scale", (table - mean).pow(2).mean().sqrt().clamp(min=1e-12), persistent=False)
        self.register_buffer("centred_norms", centred_norms, persistent=False)
        self.distinct_share = 1.0

    @property
    def num_codes(self) -> int:
        return self.embeddings.num_embeddings

    @property
    def codebook(self) -> torch.Tensor:
        """What a stored id means: the LLM's token table (the standardization follows from it)."""
        return self.embeddings.weight

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.dim**0.5 if self.metric == "cosine" else x

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """[M, dim] -> [M, vocabulary]: how near each vector is to each token, the greater the
        nearer: the cosine of the vector and the standardized row (cosine metric), or minus their
        mean squared difference per coordinate (L2)."""
        z = z.float()
        dots = z @ self.embeddings.weight.float().T - (z @ self.mean)[:, None]  # z . (e - mean) for every token e
        if self.metric == "cosine":
            return dots / (self.centred_norms * z.norm(dim=-1, keepdim=True).clamp(min=1e-12))
        # ||z - (e - mean) / scale||^2 = ||z||^2 - 2 z.(e - mean) / scale + ||e - mean||^2 / scale^2
        squared = z.pow(2).sum(-1, keepdim=True) - 2 * dots / self.scale + (self.centred_norms / self.scale) ** 2
        return -squared / self.dim

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """The token of the best score for each vector of z [..., dim]; in chunks of vectors, since
        the scores against 49,152 tokens are 200 KB a vector."""
        flat = z.detach().reshape(-1, self.dim)
        ids = [self.scores(part).argmax(1) for part in flat.split(self.chunk)]
        return torch.cat(ids).reshape(z.shape[:-1]) if ids else flat.new_zeros(z.shape[:-1]).long()

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return self._scaled((self.embeddings(indices.long()).detach().float() - self.mean) / self.scale)

    def to_embeddings(self, quantized: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Codes as ``forward`` gives them [..., dim] (their ``indices`` [...]) -> the tokens' input
        embeddings, with the vectors' straight-through gradient kept: the inverse of ``decode``."""
        if self.metric == "cosine":
            quantized = quantized * self.centred_norms[indices][..., None] / (self.scale * self.dim**0.5)
        return quantized * self.scale + self.mean

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z = self._scaled(z)
        indices = self.nearest(z)
        codes = self.decode(indices).to(z.dtype)
        counts = torch.bincount(indices.flatten(), minlength=self.num_codes).to(z.dtype)
        if self.training:
            self.distinct_share = (counts > 0).sum().item() / max(indices.numel(), 1)
        return QuantizerOutput(
            quantized=z + (codes - z).detach(),
            indices=indices.unsqueeze(-1),
            loss=self.beta * F.mse_loss(z, codes),  # the commitment term alone: the codes are frozen
            perplexity=perplexity(counts),
        )

    def fit(self, z: torch.Tensor, iterations: int = 10, seed: int = 0) -> None:
        """Nothing to fit: the codes are the LLM's tokens."""

    def fraction_alive(self) -> float:
        return self.distinct_share

"""Retrieval keys: which stored documents should a question read?

Not in the paper (``retrieval_top_k = 0`` there): every question attends over every stored
vector, and with a single codebook that attention only sees the bank's code histogram
(docs/METHOD.md, "Reading a compressed bank"), so the more documents share the
bank, the less any one of them can be read: bench/bank_size.py measured the gain of the right
bank over an unrelated one vanishing at 50 documents.

The fix keeps documents apart at a few bytes each. Beside its K code indices every document
stores a retrieval key: its sentence embedding (mean-pooled and normalised output of a *frozen*
copy of the pretrained encoder, so the key never changes meaning while the adapter trains),
product-quantized: cut into ``subspaces`` pieces, each replaced by the index of its nearest
centroid among ``codes`` (k-means on training documents). 8 pieces of 256 centroids = 8 bytes.
A question is embedded the same way and scored against every key by asymmetric distance (its
float embedding against the decoded keys, one table lookup per piece); it then reads only its
top-k documents. A learned retriever over the stored codes themselves (a contrastive loss on the
question and document networks) was tried first and learned slowly in short CPU runs; the
pretrained encoder's embedding does the job from the first step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mbc.bank.packing import index_dtype, packed_size
from mbc.errors import MBCError
from mbc.network.codebook import kmeans


class SentenceEmbedder(nn.Module):
    """A frozen encoder's mean-pooled, L2-normalised output (how all-MiniLM-L6-v2 embeds sentences)."""

    def __init__(self, encoder: nn.Module, tokenizer, max_tokens: int):
        super().__init__()
        self.encoder, self.tokenizer, self.max_tokens = encoder.requires_grad_(False).eval(), tokenizer, max_tokens

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: no dropout, ever

    @property
    def dim(self) -> int:
        config = self.encoder.config
        return getattr(config, "d_model", None) or config.hidden_size

    @torch.no_grad()
    def forward(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Texts -> unit embeddings [N, dim], encoded ``batch_size`` at a time."""
        return torch.cat([self._embed(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])

    def _embed(self, texts: list[str]) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(device)
        encoder = (
            self.encoder.get_encoder() if getattr(self.encoder.config, "is_encoder_decoder", False) else self.encoder
        )  # T5: its encoder half
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


class ProductQuantizer(nn.Module):
    """Embeddings [N, dim] <-> codes [N, subspaces], one k-means codebook per piece of the embedding."""

    def __init__(self, dim: int, subspaces: int = 8, codes: int = 256):
        super().__init__()
        if dim % subspaces:
            raise MBCError(f"retrieval_subspaces={subspaces} must divide the sentence embedding's width {dim}")
        self.subspaces, self.codes = subspaces, codes
        self.register_buffer("centroids", torch.zeros(subspaces, codes, dim // subspaces))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _pieces(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.view(embeddings.shape[0], self.subspaces, -1).transpose(0, 1)  # [S, N, piece]

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, iterations: int = 25, seed: int = 0) -> None:
        """k-means in every subspace (Lloyd's algorithm, started from distinct random embeddings)."""
        if len(embeddings) < self.codes:
            raise MBCError(
                f"fitting {self.codes} retrieval centroids needs at least {self.codes} training documents, "
                f"got {len(embeddings)}; lower retrieval_codes"
            )
        generator = torch.Generator().manual_seed(seed)
        pieces = self._pieces(embeddings.float())
        for s in range(self.subspaces):
            self.centroids[s] = kmeans(pieces[s], self.codes, iterations, generator)
        self.fitted.fill_(True)

    @torch.no_grad()
    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        pieces = self._pieces(embeddings.to(self.centroids.dtype))
        return torch.stack([torch.cdist(pieces[s], self.centroids[s]).argmin(1) for s in range(self.subspaces)], dim=1)

    def scores(self, questions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Inner product of each question embedding [B, dim] with each decoded key [N, subspaces] -> [B, N]."""
        self._check_fitted()
        tables = torch.einsum(
            "sbp,scp->bsc", self._pieces(questions.to(self.centroids.dtype)), self.centroids
        )  # [B, S, codes]
        keys = torch.as_tensor(keys, device=tables.device).long()
        return sum(tables[:, s, keys[:, s]] for s in range(self.subspaces))

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise MBCError(
                "the retrieval keys' centroids are not fitted yet: training fits them on the training documents "
                "(RetrievalKeys.fit)"
            )


class RetrievalKeys(nn.Module):
    """Texts -> stored keys, and questions -> scores against stored keys: a frozen encoder's
    sentence embedding (``SentenceEmbedder``), product-quantized (``ProductQuantizer``)."""

    def __init__(self, encoder: nn.Module, tokenizer, max_tokens: int, subspaces: int, codes: int):
        super().__init__()
        self.embedder = SentenceEmbedder(encoder, tokenizer, max_tokens)
        self.quantizer = ProductQuantizer(self.embedder.dim, subspaces, codes)

    @classmethod
    def from_config(cls, config, encoder) -> "RetrievalKeys":
        """Keys over ``encoder`` (a loaded backbone) at the sizes an ``MBCConfig`` gives."""
        return cls(
            encoder.model,
            encoder.tokenizer,
            config.max_document_tokens,
            config.retrieval_subspaces,
            config.retrieval_codes,
        )

    @property
    def centroids(self) -> torch.Tensor:
        return self.quantizer.centroids

    @property
    def fitted(self) -> bool:
        return bool(self.quantizer.fitted)

    def fit(self, documents: list[str]) -> None:
        """The centroids (k-means) fitted on these documents' embeddings; training does this once,
        before the first step, on the training documents."""
        self.quantizer.fit(self.embedder(documents))

    @torch.no_grad()
    def keys_of(self, documents: list[str]) -> np.ndarray:
        """Documents -> their keys [N, subspaces], as the bank stores them."""
        codes = self.quantizer.encode(self.embedder(documents))
        return codes.cpu().numpy().astype(index_dtype(self.quantizer.codes))

    @torch.no_grad()
    def scores(self, questions: list[str], keys) -> torch.Tensor:
        """Each question's score against each stored key [N, subspaces] -> [B, N]."""
        return self.quantizer.scores(self.embedder(questions), keys)

    def top(self, questions: list[str], keys, k: int) -> torch.Tensor:
        """[B, k] positions in ``keys`` of each question's best-scored documents."""
        scores = self.scores(questions, keys)
        return scores.topk(min(k, scores.shape[1]), dim=1).indices

    def bytes_per_document(self) -> int:
        return packed_size(self.quantizer.subspaces, self.quantizer.codes)

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of them: the centroids (the encoder is named in the config)."""
        return {f"quantizer.{k}": v.detach().cpu().clone() for k, v in self.quantizer.state_dict().items()}

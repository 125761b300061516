"""What a bank entry is, for MBC (code indices) and MAC (float vectors): one codec each.

A codec turns a document's K context vectors into its bank entry and back:

- ``CodebookCodec`` (MBC): each vector becomes the index of its nearest code (one per residual
  stage), stored as the smallest unsigned type in memory and bit-packed on disk; decoding looks
  the codes up. What an index means is fixed by the codebook, so the codebook is the entry's
  fingerprint.
- ``FloatCodec`` (MAC): the vectors themselves, float32. What they mean is fixed by the whole
  amortization network that made them.

- ``TokenCodec`` and ``CodedTokenCodec`` (token_memory.py, and MBC's vocabulary codes): token ids,
  16 bits each, or under a prefix code fitted on training documents (token_coding.py) in a fixed
  number of bytes. ``CodedVocabularyCodec`` stores MBC's vocabulary codes the second way.

The model holds one codec (``MBCModel.codec``) and the bank one entry format (bank/formats.py, from
the bank's stored layout), so neither asks "MBC or MAC?" again. Codecs need torch and the model;
the formats need neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mbc.bank.packing import index_dtype
from mbc.errors import MBCError
from mbc.network.token_coding import TokenCoder


@dataclass
class TrainingMemory:
    """What the bank holds in a training step, with the codebook's loss and perplexity (0 for MAC)."""

    vectors: torch.Tensor  # [N, K, dim]; straight-through codes for MBC
    vq_loss: torch.Tensor
    perplexity: torch.Tensor
    indices: torch.Tensor | None = None  # [N, K, stages] (MBC): the codes the vectors stand for


class CodebookCodec:
    """MBC: vectors <-> code indices [N, K, stages] through the model's (residual) quantizer."""

    mode = "mbc"

    def __init__(self, quantizer, codebook_size: int, stages: int):
        self.quantizer, self.codebook_size, self.stages = quantizer, codebook_size, stages

    def training_memory(self, contexts: torch.Tensor) -> TrainingMemory:
        quantized = self.quantizer(contexts)
        return TrainingMemory(quantized.quantized, quantized.loss, quantized.perplexity, quantized.indices)

    def encode(self, contexts: torch.Tensor, filled: list[int] | None = None) -> np.ndarray:
        """``filled``: how many slots each document fills (``MBCModel.filled_slots``); a fixed-width
        entry stores all K whatever it says."""
        return self.quantizer.encode(contexts).cpu().numpy().astype(index_dtype(self.codebook_size))

    def decode(self, entries: torch.Tensor) -> torch.Tensor:
        """Entries [..., stages] -> vectors [..., dim]."""
        if entries.shape[-1] != self.stages:
            raise MBCError(
                f"bank entries have {entries.shape[-1]} indices per vector; this codebook has {self.stages} stages"
            )
        return self.quantizer.decode(entries.long())

    def token_ids(self, entries: np.ndarray) -> list[list[int]]:
        """Vocabulary codes (network/vocabulary.py): each entry's first-stage indices, which are token ids."""
        return np.asarray(entries)[..., 0].tolist()

    lexical_ids = token_ids  # BM25 matches the codes themselves (no index of rare tokens)
    index_width = 0

    def kept(self, ids: list[list[int]], filled: list[int] | None = None) -> list[list[int]]:
        """Of each document's K token ids, what its entry gives back: all K."""
        return ids

    def meaning(self, model) -> list[torch.Tensor]:
        """The tensors a stored index's meaning depends on: the codebooks and the slot
        normalisation statistics the indices were computed under."""
        norm = model.amortization.slot_norm
        return self.quantizer.tables() + ([norm.running_mean, norm.running_std] if norm is not None else [])

    def fraction_alive(self) -> float:
        return self.quantizer.fraction_alive()


class FloatCodec:
    """MAC: the context vectors themselves, float32 [N, K, dim]."""

    mode = "mac"

    def training_memory(self, contexts: torch.Tensor) -> TrainingMemory:
        zero = contexts.new_zeros(())
        return TrainingMemory(contexts, zero, zero)

    def encode(self, contexts: torch.Tensor, filled: list[int] | None = None) -> np.ndarray:
        return contexts.float().cpu().numpy()

    def decode(self, entries: torch.Tensor) -> torch.Tensor:
        return entries.float()

    def meaning(self, model) -> list[torch.Tensor]:
        return [t for _, t in sorted(model.amortization.state_dict().items())]

    def fraction_alive(self) -> float:
        return 1.0


class PrefixCode(nn.Module):
    """The code lengths of a prefix code over the LLM's tokens (token_coding.py), a buffer saved
    with the model that uses it, and the ``TokenCoder`` they define."""

    def __init__(self, vocabulary: int):
        super().__init__()
        self.register_buffer("lengths", torch.zeros(vocabulary + 1, dtype=torch.uint8))  # + END

    def fit(self, documents: list[list[int]]) -> None:
        """The code for the token frequencies of these documents' ids (training documents)."""
        self.lengths.copy_(torch.as_tensor(TokenCoder.fit(documents, len(self.lengths) - 1).lengths))

    @property
    def fitted(self) -> bool:
        return bool(self.lengths.all())

    def coder(self) -> TokenCoder:
        """The coder, rebuilt only when the lengths change (a load)."""
        lengths = self.lengths.cpu().numpy().astype(np.int64)
        cached = self.__dict__.get("_coder")
        if cached is None or not np.array_equal(cached.lengths, lengths):
            if not self.fitted:
                raise MBCError("this model's prefix code is not fitted: fit it on training documents first")
            cached = self.__dict__["_coder"] = TokenCoder(lengths)
        return cached


class TokenCodec:
    """Token ids <-> bank entries [K, 1] (one "stage"), padded with ``pad`` past the vocabulary."""

    mode = "tokens"

    def __init__(self, vocabulary: int, keep: int):
        self.pad, self.keep = vocabulary, keep
        self.codebook_size = vocabulary + 1  # the pad index too: still 16 bits for SmolLM2's 49,152

    @property
    def most_tokens(self) -> int:
        return self.keep

    def encode(self, kept: list[list[int]]) -> np.ndarray:
        entries = np.full((len(kept), self.keep, 1), self.pad, dtype=np.uint32)
        for row, ids in enumerate(kept):
            entries[row, : len(ids), 0] = ids
        return entries

    def decode(self, entries: np.ndarray) -> list[list[int]]:
        return [[int(i) for i in entry[:, 0] if i != self.pad] for entry in np.asarray(entries)]


class CodedTokenCodec:
    """Token ids <-> bank entries [budget, 1] of bytes: the ids under a prefix code
    (``PrefixCode``), closed by its END symbol and padded with zero bits."""

    mode = "coded_tokens"
    codebook_size = 256  # an entry's "codes" are its bytes

    def __init__(self, prefix_code: PrefixCode, budget: int):
        self.prefix_code, self.keep = prefix_code, budget
        self.pad = len(prefix_code.lengths) - 1  # the vocabulary's size: no token

    @property
    def most_tokens(self) -> int:
        """The most ids an entry can hold, so that every entry's ids fit one width however many a document kept."""
        return self.prefix_code.coder().most_ids(self.keep)

    def encode(self, kept: list[list[int]]) -> np.ndarray:
        coder = self.prefix_code.coder()
        rows = [np.frombuffer(coder.encode(ids, self.keep), dtype=np.uint8) for ids in kept]
        return np.stack(rows)[:, :, None] if rows else np.zeros((0, self.keep, 1), dtype=np.uint8)

    def decode(self, entries: np.ndarray) -> list[list[int]]:
        coder = self.prefix_code.coder()
        return [coder.decode(np.asarray(entry[:, 0], dtype=np.uint8).tobytes()) for entry in np.asarray(entries)]


class CodedVocabularyCodec:
    """MBC's vocabulary codes (network/vocabulary.py, one stage) stored under a prefix code in
    ``budget`` bytes: the codebook quantizes in training and writes the K token ids; the bank holds
    the longest head of them that fits (``code_entry_bytes`` in config.py). Read as tokens
    (``code_reading="input"``), so no entry is turned back into vectors."""

    mode = "coded_mbc"
    codebook_size = CodedTokenCodec.codebook_size

    def __init__(self, codebook: CodebookCodec, prefix_code: PrefixCode, budget: int, index_budget: int = 0):
        self.codebook, self.prefix_code = codebook, prefix_code
        self.stored = CodedTokenCodec(prefix_code, budget)
        # after the codes, the document's rarest other tokens: BM25's index, never read (config.py)
        self.index = CodedTokenCodec(prefix_code, index_budget) if index_budget else None

    def training_memory(self, contexts: torch.Tensor) -> TrainingMemory:
        return self.codebook.training_memory(contexts)

    def encode(
        self, contexts: torch.Tensor, filled: list[int] | None = None, documents: list[list[int]] | None = None
    ) -> np.ndarray:
        """``filled``: how many slots each document fills (``MBCModel.filled_slots``; None: all K);
        ``documents``: each document's token ids, whose rarest the index holds (needed with an index)."""
        kept = self.kept(self.codebook.token_ids(self.codebook.encode(contexts)), filled)
        if self.index is None:
            return self.stored.encode(kept)
        if documents is None:
            raise MBCError("an entry with an index of rare tokens needs each document's token ids")
        return np.concatenate([self.stored.encode(kept), self.index.encode(self.rarest(kept, documents))], axis=1)

    def rarest(self, kept: list[list[int]], documents: list[list[int]]) -> list[list[int]]:
        """Each document's distinct tokens that its codes do not hold, rarest (longest code) first, as
        many as fit the index's bytes."""
        coder, rows = self.prefix_code.coder(), []
        for codes, ids in zip(kept, documents):
            held = set(codes)
            others = sorted({t for t in ids if t not in held}, key=lambda t: (-int(coder.lengths[t]), t))
            rows.append([others[p] for p in coder.most_that_fit(others, self.index.keep)])
        return rows

    def kept(self, ids: list[list[int]], filled: list[int] | None = None) -> list[list[int]]:
        """Of each document's K token ids, what its entry holds: the longest head of the filled
        slots' that fits the budget."""
        coder, filled = self.prefix_code.coder(), filled or [len(row) for row in ids]
        return [coder.longest_head(row[:count], self.stored.keep) for row, count in zip(ids, filled)]

    def decode(self, entries: torch.Tensor) -> torch.Tensor:
        raise MBCError("prefix-coded vocabulary codes are read as tokens (code_reading 'input'), not as vectors")

    def token_ids(self, entries: np.ndarray) -> list[list[int]]:
        """The codes each entry holds: what the reader reads."""
        return self.stored.decode(np.asarray(entries)[:, : self.stored.keep])

    def lexical_ids(self, entries: np.ndarray) -> list[list[int]]:
        """The tokens BM25 matches a question against: the codes, and the index's after them."""
        codes = self.token_ids(entries)
        if self.index is None:
            return codes
        return [c + i for c, i in zip(codes, self.index.decode(np.asarray(entries)[:, self.stored.keep :]))]

    @property
    def entry_bytes(self) -> int:
        """An entry's bytes: the codes', then the index's."""
        return self.stored.keep + (self.index.keep if self.index is not None else 0)

    @property
    def index_width(self) -> int:
        """The most tokens an entry's index can hold (0: no index)."""
        return self.index.most_tokens if self.index is not None else 0

    def meaning(self, model) -> list[torch.Tensor]:
        return self.codebook.meaning(model) + [self.prefix_code.lengths.float()]

    def fraction_alive(self) -> float:
        return self.codebook.fraction_alive()

"""What a bank entry is, for MBC (code indices) and MAC (float vectors): one codec each.

A codec turns a document's K context vectors into its bank entry and back:

- ``CodebookCodec`` (MBC): each vector becomes the index of its nearest code (one per residual
  stage), stored as the smallest unsigned type in memory and bit-packed on disk; decoding looks
  the codes up. What an index means is fixed by the codebook, so the codebook is the entry's
  fingerprint.
- ``FloatCodec`` (MAC): the vectors themselves, float32. What they mean is fixed by the whole
  amortization network that made them.

The model holds one codec (``MBCModel.codec``) and the bank one entry format (``EntryFormat``, from
the bank's stored layout), so neither asks "MBC or MAC?" again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mbc.errors import MBCError
from mbc.memory.packing import index_dtype, pack_indices, packed_size, unpack_indices


@dataclass
class TrainingMemory:
    """What the bank holds in a training step, with the codebook's loss and perplexity (0 for MAC)."""

    vectors: torch.Tensor  # [N, K, dim]; straight-through codes for MBC
    vq_loss: torch.Tensor
    perplexity: torch.Tensor


class CodebookCodec:
    """MBC: vectors <-> code indices [N, K, stages] through the model's (residual) quantizer."""

    mode = "mbc"

    def __init__(self, quantizer, codebook_size: int, stages: int):
        self.quantizer, self.codebook_size, self.stages = quantizer, codebook_size, stages

    def training_memory(self, contexts: torch.Tensor) -> TrainingMemory:
        quantized = self.quantizer(contexts)
        return TrainingMemory(quantized.quantized, quantized.loss, quantized.perplexity)

    def encode(self, contexts: torch.Tensor) -> np.ndarray:
        return self.quantizer.encode(contexts).cpu().numpy().astype(index_dtype(self.codebook_size))

    def decode(self, entries: torch.Tensor) -> torch.Tensor:
        """Entries [..., stages] -> vectors [..., dim]."""
        if entries.shape[-1] != self.stages:
            raise MBCError(
                f"bank entries have {entries.shape[-1]} indices per vector; this codebook has {self.stages} stages"
            )
        return self.quantizer.decode(entries.long())

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

    def encode(self, contexts: torch.Tensor) -> np.ndarray:
        return contexts.float().cpu().numpy()

    def decode(self, entries: torch.Tensor) -> torch.Tensor:
        return entries.float()

    def meaning(self, model) -> list[torch.Tensor]:
        return [t for _, t in sorted(model.amortization.state_dict().items())]

    def fraction_alive(self) -> float:
        return 1.0


# ---- the bank side: entries as bytes, no model needed -------------------------------------------
class CodeFormat:
    """MBC entries on disk: K x stages indices among ``codebook_size`` codes, bit-packed."""

    def __init__(self, num_slots: int, stages: int, codebook_size: int):
        self.num_slots, self.stages, self.codebook_size = num_slots, stages, codebook_size
        self.shape = (num_slots, stages)
        self.bytes = packed_size(num_slots * stages, codebook_size)

    def to_bytes(self, entry: np.ndarray) -> bytes:
        return pack_indices(entry, self.codebook_size)

    def from_bytes(self, blob: bytes) -> np.ndarray:
        return unpack_indices(blob, self.num_slots * self.stages, self.codebook_size).reshape(self.shape)

    def vector_keys(self, entry: np.ndarray) -> np.ndarray:
        """One integer per stored vector (its code tuple, in base ``codebook_size``): what the bank's code counts count."""
        keys = np.zeros(entry.shape[0], dtype=np.int64)
        for stage in reversed(range(self.stages)):
            keys = keys * self.codebook_size + entry[:, stage].astype(np.int64)
        return keys

    def codes_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Inverse of ``vector_keys``: [n] keys -> [n, stages] indices."""
        codes = np.empty((len(keys), self.stages), dtype=index_dtype(self.codebook_size))
        rest = keys.astype(np.int64)
        for stage in range(self.stages):
            codes[:, stage] = rest % self.codebook_size
            rest = rest // self.codebook_size
        return codes


class FloatFormat:
    """MAC entries on disk: K x dim little-endian float32. Float vectors are not counted (no code counts)."""

    def __init__(self, num_slots: int, dim: int):
        self.shape = (num_slots, dim)
        self.bytes = num_slots * dim * 4

    def to_bytes(self, entry: np.ndarray) -> bytes:
        if not np.all(np.isfinite(entry)):
            raise MBCError("a MAC entry holds NaN or infinite values: the model that made it has diverged")
        return np.ascontiguousarray(entry, dtype="<f4").tobytes()

    def from_bytes(self, blob: bytes) -> np.ndarray:
        if len(blob) != self.bytes:
            raise MBCError(f"a stored MAC entry has {len(blob)} bytes, expected {self.bytes}: the bank is damaged")
        return np.frombuffer(blob, dtype="<f4").reshape(self.shape).astype(np.float32)

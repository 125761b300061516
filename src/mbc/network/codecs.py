"""What a bank entry is, for MBC (code indices) and MAC (float vectors): one codec each.

A codec turns a document's K context vectors into its bank entry and back:

- ``CodebookCodec`` (MBC): each vector becomes the index of its nearest code (one per residual
  stage), stored as the smallest unsigned type in memory and bit-packed on disk; decoding looks
  the codes up. What an index means is fixed by the codebook, so the codebook is the entry's
  fingerprint.
- ``FloatCodec`` (MAC): the vectors themselves, float32. What they mean is fixed by the whole
  amortization network that made them.

The model holds one codec (``MBCModel.codec``) and the bank one entry format (bank/formats.py, from
the bank's stored layout), so neither asks "MBC or MAC?" again. Codecs need torch and the model;
the formats need neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mbc.bank.packing import index_dtype
from mbc.errors import MBCError


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

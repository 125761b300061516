"""What the memory's application half (ingest, the readers, the service) needs of a model.

Two kinds of model keep documents in a bank: MBC and MAC (model.py) and the token memory
(token_memory.py). Both compose the same ``FrozenLLM`` and ``RetrievalKeys``; this module names
what ingest and the readers call on them, so that this layer depends on the contract, not on a
model module. ``Memory`` is every model's; ``AggregatingMemory`` adds what the readers that
aggregate stored vectors by cross-attention (MBC's and MAC's, not the token memory's) need.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mbc.bank import BankLayout
from mbc.network.decoding import DecodingConfig
from mbc.network.frozen_llm import FrozenLLM
from mbc.network.retrieval import RetrievalKeys


@runtime_checkable
class Memory(Protocol):
    config: Any  # the model's settings (MBCConfig or TokenMemoryConfig)
    llm: FrozenLLM
    retrieval_keys: RetrievalKeys | None  # None: the model reads its whole bank
    trained_on: str | None  # what training read (kept in the checkpoint), shown to users
    codec: Any  # codes <-> what the reader reads; ``codec.mode`` names the bank's kind

    @property
    def document_tokenizer(self) -> Any: ...

    def compress(self, documents: list[str]) -> np.ndarray:
        """Each document's bank entry (one row per document)."""

    def stored_keys(self, bank, ids: list[int]) -> torch.Tensor:
        """The retrieval keys the bank holds for ``ids``, ready for ``top_documents``."""

    def top_documents(self, questions: list[str], document_keys) -> torch.Tensor:
        """For each question, the positions of the documents it reads, best first."""

    def answer_read(self, reader, questions: list[str], decoding: DecodingConfig | None = None):
        """The answers to ``questions`` from what ``reader`` reads, and the ids of the documents read."""

    def bank_layout(self) -> BankLayout: ...

    def bank_fingerprint(self) -> str:
        """Changes whenever a stored entry would be read differently (a bank refuses another)."""

    def bytes_per_document(self) -> dict[str, float]: ...

    def train(self, mode: bool = True): ...

    def eval(self): ...


@runtime_checkable
class AggregatingMemory(Memory, Protocol):
    aggregator: torch.nn.Module  # cross-attention of the question's queries over stored vectors

    @property
    def device(self) -> torch.device: ...

    def memory(self, entries: np.ndarray) -> torch.Tensor:
        """Stored entries -> the vectors the aggregator attends over."""

    def queries(self, questions: list[str]) -> torch.Tensor: ...

    def read_documents(self, queries: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The modulation of each question read from its chosen documents' vectors."""

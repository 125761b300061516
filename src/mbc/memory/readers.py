"""Readers: a bank (on disk or in memory) -> each question's modulation; and answering through one.

Validation, the online evaluation and a user's questions all read a bank through these. A reader
keeps what it derives from the bank until the bank changes:

- ``FullReader``: attention over every stored vector, as the method defines it. Its cost grows
  with the bank; the reference for the two below.
- ``CodeCountReader`` (MBC): attention over the distinct stored vectors (at most C codes with one
  codebook), each weighted by how often it occurs (docs/METHOD.md, "Reading a compressed
  bank"). The same modulation as ``FullReader``, at a cost that does not grow with the
  number of documents.
- ``WindowedReader`` (MAC, or any bank): the method's memory-bounded aggregation over the top-k
  documents a cheap score preselects: windows of documents are aggregated, then the window
  outputs, until one remains. The preselection keeps the cost per question bounded; its score is
  the first aggregation block's attention logit between the question's mean query and each
  document's mean vector.
- ``RetrievalReader`` (a model with ``retrieval_top_k`` > 0, retrieval.py): each question reads
  only the top-k documents by their stored retrieval keys. The keys are kept in memory (a few
  bytes per document), so a question costs one table lookup per key piece and document, plus
  attention over k documents. A token memory (token_memory.py) is read through it too: its
  ``top_ids`` say which document's kept tokens a question reads.

A model answers through a reader with ``answer_read(reader, questions, decoding)``: MBC from the
modulation, a token memory from the kept tokens' text.
"""

from __future__ import annotations

import torch

from mbc.bank import MemoryBank
from mbc.errors import MBCError, check_texts
from mbc.memory.protocol import AggregatingMemory, Memory
from mbc.network.decoding import DecodingConfig


class Reader:
    """Keeps what it derives from a bank until the bank changes."""

    def __init__(self, model: AggregatingMemory, bank: MemoryBank):
        if model.retrieval_keys is not None and not isinstance(self, RetrievalReader):
            raise MBCError(
                f"this model reads only its top {model.config.retrieval_top_k} documents per question "
                "(retrieval_top_k): read its bank with RetrievalReader (reader 'auto' or 'retrieval')"
            )
        if bank.layout.mode != model.codec.mode:
            raise MBCError(
                f"a {bank.layout.mode.upper()} bank cannot be read by a model with quantize={model.config.quantize}"
            )
        self.model, self.bank, self._version = model, bank, None

    def modulation(self, questions: list[str]) -> torch.Tensor:
        return self.read(questions)[0]

    def read(self, questions: list[str]) -> tuple[torch.Tensor, list[list[int]] | None]:
        """Each question's modulation, and the bank ids of the documents it read (None: the whole bank)."""
        self._refresh()
        return self._modulation(questions), None

    def _refresh(self) -> None:
        """Rederive from the bank if it changed since the last look."""
        if len(self.bank) == 0:
            raise MBCError(f"the bank {self.bank.address} is empty: add documents before asking questions")
        if self._version != self.bank.version:
            self._prepare()
            self._version = self.bank.version

    def _prepare(self) -> None:
        raise NotImplementedError

    def _modulation(self, questions: list[str]) -> torch.Tensor:
        raise NotImplementedError


class FullReader(Reader):
    """Attention over every vector of the bank (cost grows with the bank)."""

    def _prepare(self) -> None:
        self.keys_values = self.model.aggregator.keys_values(self.model.memory(self.bank.entries())[None])

    def _modulation(self, questions):
        return self.model.aggregator(self.model.queries(questions), None, memory_keys_values=self.keys_values)


class CodeCountReader(Reader):
    """MBC: attention over the distinct stored vectors weighted by their counts (cost O(C))."""

    def __init__(self, model: AggregatingMemory, bank: MemoryBank):
        if bank.layout.mode != "mbc":
            raise MBCError("CodeCountReader reads an MBC (codebook) bank; read a MAC bank with WindowedReader")
        super().__init__(model, bank)

    def _prepare(self) -> None:
        codes, counts = self.bank.code_counts()
        vectors = self.model.memory(codes)  # one vector per distinct code tuple
        self.keys_values = self.model.aggregator.keys_values(vectors[None])
        self.log_counts = torch.as_tensor(counts, dtype=vectors.dtype, device=vectors.device).log()[None]

    def _modulation(self, questions):
        return self.model.aggregator(
            self.model.queries(questions), None, memory_log_weight=self.log_counts, memory_keys_values=self.keys_values
        )


class _DocumentKeysReader(Reader):
    """Keeps one key per stored document, updated incrementally: only documents added since the
    last look are keyed; removed ones are dropped."""

    def __init__(self, model: AggregatingMemory, bank: MemoryBank):
        super().__init__(model, bank)
        self.ids: list[int] = []
        self.document_keys = None

    def _prepare(self) -> None:
        ids = self.bank.ids()
        current, known = set(ids), set(self.ids)
        keep = [i for i, d in enumerate(self.ids) if d in current]
        new = [d for d in ids if d not in known]
        keys = [self.document_keys[keep]] if self.document_keys is not None else []
        keys += [self._keys(new[start : start + 4096]) for start in range(0, len(new), 4096)]
        self.ids = [self.ids[i] for i in keep] + new
        self.document_keys = torch.cat(keys)  # [N, key width]

    def _keys(self, ids: list[int]) -> torch.Tensor:
        """One key per document of these bank ids, [n, key width]."""
        raise NotImplementedError

    def _documents(self, positions: list[int]) -> torch.Tensor:
        """Stored vectors of the documents at these positions of ``self.ids``, [n, K, dim]."""
        return self._documents_by_id([self.ids[i] for i in positions])

    def _documents_by_id(self, ids: list[int]) -> torch.Tensor:
        return self.model.memory(self.bank.entries(ids)).view(len(ids), -1, self.model.llm.layout.hidden_size)


class WindowedReader(_DocumentKeysReader):
    """Top-k documents by a cheap score, then windowed hierarchical aggregation over them."""

    def __init__(self, model: AggregatingMemory, bank: MemoryBank, window: int = 16, top_k: int = 64):
        if window < 2 or top_k < 1:
            raise MBCError(f"window must be >= 2 and top_k >= 1, got {window} and {top_k}")
        super().__init__(model, bank)
        self.window, self.top_k = window, top_k

    def _keys(self, ids):
        return self.model.aggregator.preselection_keys(self._documents_by_id(ids).mean(1))

    def _modulation(self, questions):
        queries = self.model.queries(questions)
        question_keys = self.model.aggregator.preselection_queries(queries)  # [B, heads * head_dim]
        top = (question_keys @ self.document_keys.T).topk(min(self.top_k, len(self.ids)), dim=1).indices
        return torch.cat([self._hierarchical(queries[b : b + 1], top[b].tolist()) for b in range(len(questions))])

    def _hierarchical(self, queries: torch.Tensor, positions: list[int]) -> torch.Tensor:
        dim = self.model.llm.layout.hidden_size
        level = self._documents(positions)  # [items, vectors, dim]
        while True:
            outputs = [
                self.model.aggregator(queries, level[s : s + self.window].reshape(1, -1, dim))
                for s in range(0, len(level), self.window)
            ]
            if len(outputs) == 1:
                return outputs[0]
            level = torch.cat(outputs)  # each window's K aggregated vectors: the next level's items


class RetrievalReader(_DocumentKeysReader):
    """Each question reads only the top-k documents by their stored retrieval keys (retrieval.py):
    only the chosen documents are decoded."""

    def __init__(self, model: AggregatingMemory, bank: MemoryBank):
        if model.retrieval_keys is None:
            raise MBCError("RetrievalReader needs a model with retrieval keys (retrieval_top_k > 0)")
        super().__init__(model, bank)

    def _keys(self, ids):
        return self.model.stored_keys(self.bank, ids)

    def top_ids(self, questions: list[str]) -> list[list[int]]:
        """Bank ids of the documents each question reads, best first."""
        self._refresh()
        return self._ids(self.model.top_documents(questions, self.document_keys))

    def read(self, questions):
        self._refresh()
        top = self.model.top_documents(questions, self.document_keys)  # once, for the reading and the ids
        return self._read_top(questions, top), self._ids(top)

    def _ids(self, top: torch.Tensor) -> list[list[int]]:
        return [[self.ids[p] for p in row] for row in top.tolist()]

    def _modulation(self, questions):
        return self._read_top(questions, self.model.top_documents(questions, self.document_keys))

    def _read_top(self, questions: list[str], top: torch.Tensor) -> torch.Tensor:
        needed = sorted(set(top.flatten().tolist()))
        position = {p: j for j, p in enumerate(needed)}
        where = torch.as_tensor([position[p] for p in top.flatten().tolist()], device=self.model.device).view_as(top)
        return self.model.read_documents(self.model.queries(questions), self._documents(needed)[where])


def reader_for(model: Memory, bank: MemoryBank, kind: str = "auto", **options) -> Reader:
    """``auto``: retrieval keys when the model has them, else code counts for an MBC bank and
    windows over top-k documents for a MAC bank."""
    kinds = {"full": FullReader, "counts": CodeCountReader, "windowed": WindowedReader, "retrieval": RetrievalReader}
    if kind == "auto":
        kind = (
            "retrieval" if model.retrieval_keys is not None else "counts" if bank.layout.mode == "mbc" else "windowed"
        )
    if kind not in kinds:
        raise MBCError(f"unknown reader '{kind}'; choose auto, {', '.join(kinds)}")
    return kinds[kind](model, bank, **options)


@torch.no_grad()
def answer_from_bank(
    model: Memory, reader: Reader, questions: list[str], decoding: DecodingConfig | None = None
) -> list[str]:
    """Answer each question from the bank the reader reads."""
    if not check_texts(questions, "questions"):
        return []
    return model.answer_read(reader, questions, decoding)[0]

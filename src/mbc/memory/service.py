"""A trained model and its bank, as a user works with them: add documents, ask, list, delete.

``mbc ingest``, ``mbc ask``, ``mbc bank`` and ``mbc serve`` are thin layers over ``MemoryService``:

    service = MemoryService.open("notes.db", "runs/generated/last")
    service.add([Document("Mira Okafor founded the Brellin Observatory in 1987.", {"path": "notes.txt"})])
    service.ask(["Who founded the Brellin Observatory?"])  # answers, the documents read, seconds

Documents longer than the document encoder's window are stored as passages (sources.py); each
stored passage carries its source, the time it was added and its length as metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from mbc.errors import MBCError, check_texts
from mbc.memory.sources import Document, Passages

# How many passages are compressed and stored in one transaction: a kill loses at most this many
# unreported ones, and a rerun compresses them again.
BATCH_SIZE = 16
# A question's length in the LLM's tokens: the prompt is never cut, and a 100 KB question took
# gigabytes. Longer ones are refused before any model work (a question is a line, not a document).
MAX_QUESTION_TOKENS = 256
MAX_QUESTION_CHARACTERS = 16 * MAX_QUESTION_TOKENS  # refused without tokenizing: no token is this long


def load_model(folder: str | Path):
    """A checkpoint folder's model: an MBC or MAC adapter, or a token memory (token_memory.py)."""
    from mbc.model import MBCModel
    from mbc.token_memory import TokenMemory, is_token_memory

    return (TokenMemory if is_token_memory(folder) else MBCModel).from_pretrained(folder).eval()


@dataclass
class AddReport:
    added: int = 0  # passages newly stored
    duplicates: int = 0  # passages whose content the bank already held
    documents: int = 0  # documents read (before cutting into passages)
    ids: list[int] = field(default_factory=list)  # bank id of each passage, in order

    def merge(self, other: "AddReport") -> None:
        self.added += other.added
        self.duplicates += other.duplicates
        self.documents += other.documents
        self.ids += other.ids


class MemoryService:
    """One model and one bank. Not safe for use from several threads at once (the server keeps
    it on one thread); several processes may share the bank."""

    def __init__(self, model, bank, model_path: Path | None = None):
        from mbc.memory.readers import reader_for

        self.model, self.bank, self.model_path = model, bank, model_path
        self.reader = reader_for(model, bank)
        self.passages = Passages(model.document_tokenizer, self._window(model))

    @classmethod
    def open(cls, bank_address: str | Path, model_path: str | Path) -> "MemoryService":
        """Load the model (a checkpoint folder; the main job's: ``mbc.pipeline.default_model()``)
        and open (or create) its bank (a file path or a ``postgresql://`` URL)."""
        from mbc.bank import BankLayout, MemoryBank

        model_path = Path(model_path)
        model = load_model(model_path)
        return cls(model, MemoryBank.open(bank_address, BankLayout.of(model)), model_path)

    @staticmethod
    def _window(model) -> int:
        limit = getattr(model.document_tokenizer, "model_max_length", None) or model.config.max_document_tokens
        return min(model.config.max_document_tokens, limit)

    # ---- adding ------------------------------------------------------------------------------
    def add(self, documents: Iterable[Document], progress=None, report: AddReport | None = None) -> AddReport:
        """Cut each document into passages and store those the bank does not hold, ``BATCH_SIZE`` per
        transaction. ``progress`` (a tqdm bar, or None) advances by each stored batch. ``report``,
        if given, is filled in as batches are stored: after an interruption it says what is stored."""
        report = report if report is not None else AddReport()
        for batch, read in self._batches(documents):
            report.merge(self._store(batch))
            report.documents += read
            if progress is not None:
                progress.update(len(batch))
                progress.set_postfix(added=report.added, duplicates=report.duplicates)
        return report

    def _batches(self, documents: Iterable[Document]) -> Iterator[tuple[list[Document], int]]:
        """Batches of passages, each with how many documents were finished in it."""
        batch, finished = [], 0
        for document in documents:
            batch += self.passages(document)
            finished += 1
            while len(batch) >= BATCH_SIZE:
                yield batch[:BATCH_SIZE], finished
                batch, finished = batch[BATCH_SIZE:], 0
        if batch or finished:
            yield batch, finished

    def _store(self, passages: list[Document]) -> AddReport:
        from mbc.memory.ingest import ingest

        if not passages:
            return AddReport()
        texts = [p.text for p in passages]  # ingest() checks them
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        metadata = [{**p.source, "added": now, "characters": len(p.text)} for p in passages]
        result = ingest(self.model, self.bank, texts, metadata, batch_size=BATCH_SIZE)
        return AddReport(result.added, result.duplicates, 0, result.ids)

    # ---- asking ------------------------------------------------------------------------------
    def ask(self, questions: list[str], decoding=None) -> dict:
        """Each question's answer and the stored documents it read (retrieval keys say which; a
        model without them reads the whole bank), with the seconds taken."""
        import torch

        questions = self.check_questions(questions)
        start = time.perf_counter()
        with torch.no_grad():
            answers, read = self.model.answer_read(self.reader, questions, decoding)
        read = read or [None] * len(questions)
        seconds = time.perf_counter() - start
        return {
            "answers": [
                {
                    "question": question,
                    "answer": answer,
                    "documents": None if ids is None else [self.document(i) for i in ids],
                }
                for question, answer, ids in zip(questions, answers, read)
            ],
            "seconds": round(seconds, 3),
        }

    def check_questions(self, questions: list[str]) -> list[str]:
        """The questions, or one line naming the first over ``MAX_QUESTION_TOKENS``."""
        questions = check_texts(questions, "questions")
        for index, question in enumerate(questions):
            if len(question) > MAX_QUESTION_CHARACTERS:
                length = f"{len(question):,} characters"
            else:
                tokens = len(self.model.llm.tokenizer(question, add_special_tokens=False)["input_ids"])
                if tokens <= MAX_QUESTION_TOKENS:
                    continue
                length = f"{tokens:,} tokens"
            raise MBCError(
                f"question {index} is {length} long; a question may have at most {MAX_QUESTION_TOKENS} tokens: "
                "ask it shorter (documents go into the bank with add / mbc ingest)"
            )
        return questions

    # ---- the stored documents -----------------------------------------------------------------
    def document(self, document_id: int) -> dict:
        return {"id": document_id, "metadata": self.bank.metadata(document_id)}

    def listing(self, offset: int = 0, limit: int = 100) -> list[dict]:
        return self.bank.listing(offset, limit)

    def delete(self, document_id: int) -> None:
        self.bank.remove(document_id)

    def stats(self) -> dict:
        return bank_stats(self.bank) | {
            "model": str(self.model_path) if self.model_path else None,
            "model_trained_on": self.model.trained_on,
        }


def bank_stats(bank) -> dict:
    """Sizes of a bank and what they come to per document."""
    sizes = bank.sizes()
    per_document = sizes["stored_bytes"] / sizes["documents"] if sizes["documents"] else 0.0
    layout = bank.layout
    return sizes | {
        "bytes_per_document": round(per_document, 1),
        "mode": layout.mode,
        "slots": layout.num_slots,
        "codebook_size": layout.codebook_size if layout.mode == "mbc" else None,
        "path": bank.address,
    }

"""A user's documents, read from files, folders or standard input, cut to the encoder's window.

``Sources`` yields one ``Document`` (text + where it came from) per text file, Markdown file,
JSON Lines object or CSV row, walking folders recursively in name order. ``Passages`` cuts a
document longer than the document encoder's window into passages that fit it, at sentence
boundaries where it can: the encoder would otherwise silently read only the first window.
Each passage keeps its document's source and says which passage of how many it is.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mbc.errors import MBCError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
RECORD_SUFFIXES = {".jsonl", ".ndjson", ".csv"}
STDIN = "-"


@dataclass
class Document:
    text: str
    source: dict = field(default_factory=dict)  # path, and line (JSON Lines, standard input) or row (CSV)


@dataclass
class Skipped:
    path: str
    reason: str


class Sources:
    """The documents under some paths, in order; what could not be read is kept in ``skipped``.

    ``text_field``: the JSON Lines key / CSV column holding the text. ``stdin_format``: ``lines``
    (one document per line) or ``jsonl`` (one JSON object per line)."""

    def __init__(self, paths: list[str], text_field: str = "text", stdin_format: str = "lines", stdin=None):
        if stdin_format not in ("lines", "jsonl"):
            raise MBCError(f"unknown standard input format '{stdin_format}'; choose lines or jsonl")
        missing = [p for p in paths if p != STDIN and not Path(p).exists()]
        if missing:
            raise MBCError(f"no such file or folder: {', '.join(missing)}")
        if not paths:
            raise MBCError("give at least one file, folder, or - for standard input")
        self.paths, self.text_field, self.stdin_format = paths, text_field, stdin_format
        self.stdin = stdin
        self.skipped: list[Skipped] = []

    def __iter__(self) -> Iterator[Document]:
        for path in self.paths:
            if path == STDIN:
                yield from self._stdin()
            elif Path(path).is_dir():
                for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
                    if any(part.startswith(".") for part in file.relative_to(path).parts):
                        continue  # hidden files and folders (.git, editor backups)
                    if file.suffix.lower() in TEXT_SUFFIXES | RECORD_SUFFIXES:
                        yield from self._file(file)
            else:
                yield from self._file(Path(path), named=True)

    def _file(self, path: Path, named: bool = False) -> Iterator[Document]:
        suffix = path.suffix.lower()
        if named and suffix not in TEXT_SUFFIXES | RECORD_SUFFIXES:
            suffix = ".txt"  # a file named explicitly is read as text whatever its name
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            self.skipped.append(Skipped(str(path), "not UTF-8 text"))
            return
        except OSError as error:
            self.skipped.append(Skipped(str(path), error.strerror or str(error)))
            return
        if suffix in TEXT_SUFFIXES:
            if content.strip():
                yield Document(content.strip(), {"path": str(path)})
        elif suffix == ".csv":
            yield from self._csv(io.StringIO(content, newline=""), str(path))
        else:
            yield from self._jsonl(content.splitlines(), str(path))

    def _stdin(self) -> Iterator[Document]:
        lines = (self.stdin or sys.stdin).read().splitlines()
        if self.stdin_format == "jsonl":
            yield from self._jsonl(lines, "<stdin>")
            return
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield Document(line.strip(), {"path": "<stdin>", "line": number})

    def _jsonl(self, lines: Iterable[str], name: str) -> Iterator[Document]:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MBCError(f"{name}, line {number}: not JSON ({error.msg}); each line must be one JSON object")
            text = record.get(self.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise MBCError(
                    f"{name}, line {number}: no string field '{self.text_field}'; name the text field with --text-field"
                )
            if text.strip():
                yield Document(text.strip(), {"path": name, "line": number})

    def _csv(self, handle, name: str) -> Iterator[Document]:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or self.text_field not in reader.fieldnames:
            columns = ", ".join(reader.fieldnames or []) or "none"
            raise MBCError(
                f"{name} has no column '{self.text_field}' (its columns: {columns}); name it with --text-field"
            )
        for number, row in enumerate(reader, 1):
            text = row[self.text_field] or ""
            if text.strip():
                yield Document(text.strip(), {"path": name, "row": number})


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


class Passages:
    """Cuts documents into passages of at most ``max_tokens`` tokens of ``tokenizer`` (a fast
    Hugging Face tokenizer): whole sentences where they fit, a sentence longer than the window
    cut at token boundaries."""

    def __init__(self, tokenizer, max_tokens: int):
        specials = len(tokenizer("")["input_ids"])  # [CLS] and [SEP], or an EOS: they take window room too
        self.tokenizer, self.budget = tokenizer, max(8, max_tokens - specials)

    def __call__(self, document: Document) -> list[Document]:
        if self._length(document.text) <= self.budget:
            return [document]
        texts, current = [], ""
        for sentence in self._sentences(document.text):
            joined = f"{current} {sentence}" if current else sentence
            if self._length(joined) <= self.budget:
                current = joined
                continue
            if current:
                texts.append(current)
            pieces = self._cut(sentence)
            texts += pieces[:-1]
            current = pieces[-1]
        texts.append(current)
        return [
            Document(text, {**document.source, "passage": index, "passages": len(texts)})
            for index, text in enumerate(texts, 1)
        ]

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _sentences(text: str) -> list[str]:
        return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]

    def _cut(self, text: str) -> list[str]:
        """A text longer than the window, cut at token boundaries into pieces that fit."""
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        starts = [offsets[i][0] for i in range(0, len(offsets), self.budget)]
        bounds = starts[1:] + [len(text)]
        return [text[s:e].strip() for s, e in zip(starts, bounds) if text[s:e].strip()] or [text]

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
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mbc.data.loaders import MAX_CSV_FIELD
from mbc.errors import MBCError, check_encodable

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
RECORD_SUFFIXES = {".jsonl", ".ndjson", ".csv"}
STDIN = "-"
# A file is text unless its first block holds a NUL or more than this share of other control bytes
# (tab, newline, carriage return and form feed are text).
BINARY_SNIFF_BYTES, MAX_CONTROL_SHARE = 8192, 0.1
_TEXT_CONTROLS = {9, 10, 12, 13}


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
                for file in self._walk(Path(path)):
                    yield from self._file(file)
            else:
                yield from self._file(Path(path), named=True)

    def _walk(self, root: Path) -> Iterator[Path]:
        """The readable files under ``root`` in name order, following symbolic links to folders but
        entering each real folder once (a link back up would loop); hidden files and folders (.git,
        editor backups) skipped; what is neither a file nor a folder named in ``skipped``."""
        seen = set()
        for folder, folders, files in os.walk(root, followlinks=True):
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                self.skipped.append(Skipped(folder, "a link to a folder already read (a loop): read once"))
                folders[:] = []
                continue
            seen.add((info.st_dev, info.st_ino))
            folders[:] = sorted(f for f in folders if not f.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                file = Path(folder) / name
                if Path(name).suffix.lower() not in TEXT_SUFFIXES | RECORD_SUFFIXES:
                    continue
                if self._regular(file):
                    yield file

    def _regular(self, path: Path) -> bool:
        """Whether ``path`` is a regular file; if not (a FIFO, socket, device or broken link, where
        reading would block or fail), it is named in ``skipped``."""
        try:
            mode = path.stat().st_mode
        except OSError as error:
            self.skipped.append(Skipped(str(path), error.strerror or str(error)))
            return False
        if not stat.S_ISREG(mode):
            self.skipped.append(Skipped(str(path), "not a regular file (a FIFO, socket or device): not read"))
            return False
        return True

    def _file(self, path: Path, named: bool = False) -> Iterator[Document]:
        suffix = path.suffix.lower()
        if named and not self._regular(path):
            return
        if named and suffix == ".json":
            self.skipped.append(
                Skipped(str(path), "a .json file is not read as documents: give JSON Lines (.jsonl), one object a line")
            )
            return
        if named and suffix not in TEXT_SUFFIXES | RECORD_SUFFIXES:
            suffix = ".txt"  # a file named explicitly is read as text whatever its name
        try:
            raw = path.read_bytes()
            if _looks_binary(raw[:BINARY_SNIFF_BYTES]):
                self.skipped.append(Skipped(str(path), "binary data (NUL or control bytes), not text"))
                return
            content = raw.decode("utf-8")
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
            except RecursionError:
                raise MBCError(
                    f"{name}, line {number}: JSON nested too deeply to read; each line must be one flat object"
                )
            text = record.get(self.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise MBCError(
                    f"{name}, line {number}: no string field '{self.text_field}'; name the text field with --text-field"
                )
            if text.strip():
                yield Document(check_encodable(text.strip(), f"{name}, line {number}"), {"path": name, "line": number})

    def _csv(self, handle, name: str) -> Iterator[Document]:
        csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_FIELD))
        # strict: a quote left open is an error, not a field that swallows the rest of the file
        reader = csv.DictReader(handle, strict=True)
        try:
            if reader.fieldnames is None or self.text_field not in reader.fieldnames:
                columns = ", ".join(reader.fieldnames or []) or "none"
                raise MBCError(
                    f"{name} has no column '{self.text_field}' (its columns: {columns}); name it with --text-field"
                )
            for number, row in enumerate(reader, 1):
                text = row[self.text_field] or ""
                if text.strip():
                    yield Document(text.strip(), {"path": name, "row": number})
        except csv.Error as error:
            raise MBCError(
                f"{name}, line {reader.line_num}: malformed CSV ({error}); documents before it were read, "
                "none from it on: fix the quoting (a field with quotes, commas or newlines must be quoted, "
                f"inner quotes doubled) or its length (at most {MAX_CSV_FIELD:,} characters a field)"
            ) from None


def _looks_binary(block: bytes) -> bool:
    controls = sum(1 for byte in block if byte < 32 and byte not in _TEXT_CONTROLS)
    return b"\0" in block or controls > MAX_CONTROL_SHARE * max(len(block), 1)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


class Passages:
    """Cuts documents into passages of at most ``max_tokens`` tokens of ``tokenizer`` (a fast
    Hugging Face tokenizer): whole sentences where they fit, a sentence longer than the window
    cut at token boundaries.

    Time and memory are linear in the text: a passage is also at most ``CHARACTERS_PER_TOKEN`` x
    the window long (a sentence longer than that is cut at its last space within the bound, or at
    the bound), so the tokenizer only ever sees two such pieces at once, never the whole text, whose
    tokenization on a 20 MB line took minutes and gigabytes. (The character bound matters too: a
    WordPiece tokenizer reads any word over 100 characters as one unknown token.)"""

    CHARACTERS_PER_TOKEN = 8  # more than English text takes per token: a piece holds at least a window

    def __init__(self, tokenizer, max_tokens: int):
        specials = len(tokenizer("")["input_ids"])  # [CLS] and [SEP], or an EOS: they take window room too
        self.tokenizer, self.budget = tokenizer, max(8, max_tokens - specials)
        self.piece_characters = self.CHARACTERS_PER_TOKEN * self.budget

    def __call__(self, document: Document) -> list[Document]:
        text = check_encodable(document.text, f"the document from {document.source.get('path', 'the caller')}")
        if len(text) <= self.piece_characters and self._length(text) <= self.budget:
            return [document]
        texts, current = [], ""
        for sentence in self._sentences(text):
            joined = f"{current} {sentence}" if current else sentence
            if len(joined) <= self.piece_characters and self._length(joined) <= self.budget:
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

    def _sentences(self, text: str) -> Iterator[str]:
        """The text's sentences, each at most ``piece_characters`` long."""
        start = 0
        for end in _SENTENCE_END.finditer(text):
            yield from self._bounded(text[start : end.start()].strip())
            start = end.end()
        yield from self._bounded(text[start:].strip())

    def _bounded(self, sentence: str) -> Iterator[str]:
        limit = self.piece_characters
        while len(sentence) > limit:
            cut = sentence.rfind(" ", limit // 2, limit)
            cut = cut if cut > 0 else limit
            yield sentence[:cut].strip()
            sentence = sentence[cut:].strip()
        if sentence:
            yield sentence

    def _cut(self, text: str) -> list[str]:
        """A text longer than the window, cut at token boundaries into pieces that fit."""
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        starts = [offsets[i][0] for i in range(0, len(offsets), self.budget)]
        bounds = starts[1:] + [len(text)]
        return [text[s:e].strip() for s, e in zip(starts, bounds) if text[s:e].strip()] or [text]

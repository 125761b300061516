"""Question-answering data: (document, question, answers) rows from the paper's three formats.

- SQuAD v1.1 JSON: ``data[].paragraphs[].context`` with ``qas[].question`` and ``qas[].answers[].text``;
  a row's group is its article title.
- StreamingQA CSV: columns ``text``, ``question``, ``answers`` (several answers joined by a backslash);
  a row's group is its document.
- ArchivalQA CSV: columns ``question``, ``answer``, ``ans_paragraph``, ``ans_text``, ``doc_id``,
  ``para_num``; the document is ``ans_paragraph`` and the group is ``doc_id``.
- ``generated[:SEED]``: fictional documents made by ``mbc.data.generated`` (no file needed).
- ``hub:NAME[:SPLIT]``: a SQuAD-format dataset from the Hugging Face hub, when ``datasets`` is
  installed and the hub reachable.

Splits are made by group (article, document), never by question, so no document's text is seen
on both sides. Every problem in a file is reported with the file and the row it is in.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from mbc.data.examples import QAExample, first_documents, standard_split
from mbc.data.generated import generate_examples
from mbc.errors import MBCError

MAX_QUESTION_CHARS = 1000
MAX_CSV_FIELD = 16 * 1024 * 1024  # characters: Python's csv stops at 131,072 by default, less than a long document


def _check(example: QAExample, max_question_chars: int) -> QAExample:
    where = example.source
    if not example.document.strip():
        raise MBCError(f"{where}: the document (context) is empty")
    if not example.question.strip():
        raise MBCError(f"{where}: the question is empty")
    if not example.answers or any(not a.strip() for a in example.answers):
        raise MBCError(f"{where}: an answer is missing or empty")
    if len(example.question) > max_question_chars:
        raise MBCError(
            f"{where}: the question has {len(example.question)} characters, more than the limit of {max_question_chars}"
        )
    return example


def _read_text(path: Path) -> str:
    if not path.exists():
        raise MBCError(f"data file {path} does not exist")
    if path.is_dir():
        raise MBCError(f"data file {path} is a folder; give the path of a SQuAD .json or a .csv file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise MBCError(f"cannot read data file {path}: {error.strerror}") from error
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise MBCError(
            f"{path}: line {line} (byte {error.start}) is not valid UTF-8; re-save the file as UTF-8"
        ) from error


def _expect(value, kind: type, where: str, what: str):
    if not isinstance(value, kind):
        words = {list: "a list", dict: "an object", str: "a string"}[kind]
        raise MBCError(f"{where}: {what} must be {words}, got {type(value).__name__} ({str(value)[:40]!r})")
    return value


def load_squad(path: str | Path, max_question_chars: int = MAX_QUESTION_CHARS) -> list[QAExample]:
    path = Path(path)
    try:
        top = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise MBCError(f"{path} is not JSON ({error}); expected SQuAD v1.1: {{'data': [{{'title', 'paragraphs'}}]}}")
    except RecursionError:
        raise MBCError(f"{path} is nested too deeply to read; SQuAD v1.1 is five levels deep") from None
    if not isinstance(top, dict) or "data" not in top:
        raise MBCError(f"{path} is not SQuAD v1.1 JSON: expected an object with a 'data' list of articles")
    examples = []
    for a, article in enumerate(_expect(top["data"], list, str(path), "'data'")):
        where = f"{path}:data[{a}]"
        _expect(article, dict, where, "an article")
        title = article.get("title", str(a))
        for p, paragraph in enumerate(_expect(article.get("paragraphs", []), list, where, "'paragraphs'")):
            where = f"{path}:data[{a}].paragraphs[{p}]"
            _expect(paragraph, dict, where, "a paragraph")
            context = _expect(paragraph.get("context"), str, where, "'context'")
            for q, qa in enumerate(_expect(paragraph.get("qas", []), list, where, "'qas'")):
                where = f"{path}:data[{a}].paragraphs[{p}].qas[{q}]"
                _expect(qa, dict, where, "a question")
                question = _expect(qa.get("question"), str, where, "'question'")
                answers = _expect(qa.get("answers"), list, where, "'answers'")
                texts = tuple(
                    _expect(_expect(answer, dict, where, "an answer").get("text"), str, where, "an answer's 'text'")
                    for answer in answers
                )
                examples.append(_check(QAExample(context, question, texts, str(title), where), max_question_chars))
    return examples


STREAMINGQA_COLUMNS = ("text", "question", "answers")
ARCHIVALQA_COLUMNS = ("question", "answer", "ans_paragraph", "ans_text", "doc_id", "para_num")


def _csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    """The columns and rows of a CSV file; a quoted field may hold newlines and be up to 16 MiB
    characters long, and a malformed row (a quote left open) is named by its line."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_FIELD))
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), strict=True)
    try:
        return list(reader.fieldnames or []), list(reader)
    except csv.Error as error:
        raise MBCError(f"{path}, line {reader.line_num}: malformed CSV ({error}); fix its quoting") from None


def _require(path: Path, columns: list[str], needed: tuple[str, ...], kind: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise MBCError(f"{path}: not a {kind} CSV: missing columns {missing} (found {columns}; needed {list(needed)})")


def load_streamingqa(path: str | Path, max_question_chars: int = MAX_QUESTION_CHARS) -> list[QAExample]:
    path = Path(path)
    columns, rows = _csv_rows(path)
    _require(path, columns, STREAMINGQA_COLUMNS, "StreamingQA")
    examples = []
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        answers = tuple(a for a in (row["answers"] or "").split("\\"))
        group = hashlib.sha1((row["text"] or "").encode()).hexdigest()[:12]
        examples.append(
            _check(
                QAExample(row["text"] or "", row["question"] or "", answers, group, f"{path}:row {i}"),
                max_question_chars,
            )
        )
    return examples


def load_archivalqa(path: str | Path, max_question_chars: int = MAX_QUESTION_CHARS) -> list[QAExample]:
    path = Path(path)
    columns, rows = _csv_rows(path)
    _require(path, columns, ARCHIVALQA_COLUMNS, "ArchivalQA")
    examples = []
    for i, row in enumerate(rows, start=2):
        example = QAExample(
            row["ans_paragraph"] or "",
            row["question"] or "",
            (row["answer"] or "",),
            row["doc_id"] or "",
            f"{path}:row {i}",
        )
        examples.append(_check(example, max_question_chars))
    return examples


def load_hub_squad(name: str, split: str, max_question_chars: int = MAX_QUESTION_CHARS) -> list[QAExample]:
    """A SQuAD-format dataset on the Hugging Face hub (e.g. ``rajpurkar/squad``), where it is reachable."""
    try:
        import datasets
    except ImportError as error:
        raise MBCError(
            f"'hub:{name}' needs the datasets package (pip install datasets) and a reachable hub; "
            "offline, download the JSON and pass its path instead"
        ) from error
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types for an unreachable hub or a missing name
        raise MBCError(f"could not load hub dataset '{name}' split '{split}': {error}") from error
    return [
        _check(
            QAExample(
                row["context"],
                row["question"],
                tuple(row["answers"]["text"]),
                row.get("title", ""),
                f"hub:{name}/{split}:row {i}",
            ),
            max_question_chars,
        )
        for i, row in enumerate(table)
    ]


def load(spec: str, max_question_chars: int = MAX_QUESTION_CHARS) -> list[QAExample]:
    """A file (SQuAD .json, StreamingQA or ArchivalQA .csv, told apart by columns),
    ``generated[:SEED[:DOCUMENTS]]`` (default seed 0, 1,200 documents), or ``hub:NAME[:SPLIT]`` (a
    SQuAD-format hub dataset, default split validation)."""
    if spec == "generated" or spec.startswith("generated:"):
        return _generated(spec)
    if spec.startswith("hub:"):
        name, _, split = spec[4:].partition(":")
        return load_hub_squad(name, split or "validation", max_question_chars)
    path = Path(spec)
    if path.suffix == ".json":
        return load_squad(path, max_question_chars)
    if path.suffix == ".csv":
        columns, _ = _csv_rows(path)
        loader = load_archivalqa if "ans_paragraph" in columns else load_streamingqa
        return loader(path, max_question_chars)
    if not path.exists():
        raise MBCError(f"data '{spec}' is neither an existing file nor 'generated[:SEED[:DOCUMENTS]]'")
    raise MBCError(f"{path}: unknown data format '{path.suffix}'; expected SQuAD .json, StreamingQA / ArchivalQA .csv")


def _generated(spec: str) -> list[QAExample]:
    parts = spec.split(":")[1:]
    try:
        seed, count = (int(parts[0]) if parts and parts[0] else 0), (int(parts[1]) if len(parts) > 1 else 1200)
    except ValueError:
        raise MBCError(f"data '{spec}': expected generated[:SEED[:DOCUMENTS]] with whole numbers") from None
    if len(parts) > 2 or count < 10:
        raise MBCError(f"data '{spec}': expected generated[:SEED[:DOCUMENTS]] with at least 10 documents")
    return generate_examples(count, seed)


def describe_training(spec: str, rows: list[QAExample], extra_train: tuple[str, ...] = ()) -> str:
    """What a model trained on ``rows`` (the train split of ``spec``, plus ``extra_train``) read, in
    a line a user of the model is shown."""
    source = "generated fictional documents" if spec.split(":")[0] == "generated" else Path(spec).name
    extra = "".join(f" + {Path(e).name}" for e in extra_train)
    documents = len({row.document for row in rows})
    return f"{documents:,} documents and {len(rows):,} questions of {source} (train split){extra}"


def load_splits(spec: str, first: int | None = None, extra_train: tuple[str, ...] = ()) -> dict[str, list[QAExample]]:
    """``load`` + ``first_documents`` + ``standard_split``: what training and validation both rebuild.
    ``extra_train``: more data (files or specs) whose every row joins the train split; refused where
    one of its documents is also in the validation or test split."""
    splits = standard_split(first_documents(load(spec), first))
    held_out = {e.document for name in ("validation", "test") for e in splits[name]}
    for extra in extra_train:
        rows = load(extra)
        shared = sum(1 for d in dict.fromkeys(e.document for e in rows) if d in held_out)
        if shared:
            raise MBCError(
                f"{extra}: {shared} of its documents are also in the validation or test split of {spec}; "
                "extra training data must not hold documents that are evaluated"
            )
        splits["train"] = splits["train"] + rows
    return splits

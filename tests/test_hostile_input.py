"""Hostile and careless input at every door (files, the bank, the Python API, the command line):
each case gets one clear line, bounded work, and leaves the bank as it was. The server's side of
the same cases is in tests/test_server.py."""

import json
import math
import os
import sqlite3
import threading

import numpy as np
import pytest
from conftest import DOCUMENTS, byte_tokenizer
from typer.testing import CliRunner

from mbc import MBCError
from mbc.bank import MAX_METADATA_DEPTH, BankLayout, MemoryBank
from mbc.cli import app
from mbc.memory.service import MAX_QUESTION_TOKENS, AddReport, MemoryService
from mbc.memory.sources import Document, Passages, Sources

runner = CliRunner()
LAYOUT = BankLayout("mbc", num_slots=4, stages=1, codebook_size=16, dim=8, fingerprint="f")


def _bank(path, count=3):
    bank = MemoryBank.open(path, LAYOUT)
    bank.add(
        [f"document {i}" for i in range(count)], np.zeros((count, 4, 1), np.uint8), [{"i": i} for i in range(count)]
    )
    return bank


def _read(paths, **options):
    sources = Sources([str(p) for p in paths], **options)
    return [d.text for d in sources], [(s.path, s.reason) for s in sources.skipped]


# ---- files ----------------------------------------------------------------------------------------
def test_a_fifo_is_named_and_never_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "a.txt").write_text("A document.")
    result = {}
    reader = threading.Thread(
        target=lambda: result.update(named=_read([tmp_path / "pipe.txt"]), walked=_read([tmp_path]))
    )
    reader.start()
    reader.join(20)  # reading a FIFO blocks until a writer comes: here none ever does
    assert not reader.is_alive(), "reading blocked on the FIFO"
    for texts, skipped in result.values():
        assert [reason for _, reason in skipped] == ["not a regular file (a FIFO, socket or device): not read"]
    assert result["walked"][0] == ["A document."]


def test_binary_and_json_files_are_skipped_with_a_line(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "controls.md").write_bytes(b"text \x01\x02\x03\x04\x05\x06 " * 50)
    (tmp_path / "doc.json").write_text(json.dumps({"text": "a whole object"}))
    (tmp_path / "fine.txt").write_text("Tabs\tand\r\nnewlines are text.\f")
    texts, skipped = _read(
        [tmp_path / "blob.txt", tmp_path / "controls.md", tmp_path / "doc.json", tmp_path / "fine.txt"]
    )
    assert texts == ["Tabs\tand\r\nnewlines are text."]
    reasons = [reason for _, reason in skipped]
    assert reasons[:2] == ["binary data (NUL or control bytes), not text"] * 2
    assert "give JSON Lines (.jsonl)" in reasons[2]


def test_a_malformed_csv_is_reported_not_swallowed(tmp_path):
    (tmp_path / "open.csv").write_text('text,n\n"first",1\n"never closed,2\nthird,3\n')
    with pytest.raises(MBCError, match=r"open.csv, line \d+: malformed CSV \(unexpected end of data\)"):
        _read([tmp_path / "open.csv"])


def test_a_long_csv_field_is_read(tmp_path):
    long = "word " * 60_000  # 300,000 characters: over Python's default limit of 131,072
    (tmp_path / "long.csv").write_text(f'text\n"{long}"\nshort\n')
    texts, skipped = _read([tmp_path / "long.csv"])
    assert texts == [long.strip(), "short"] and skipped == []


def test_json_lines_nested_too_deep_and_lone_surrogates_get_one_line(tmp_path):
    (tmp_path / "deep.jsonl").write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(MBCError, match=r"deep.jsonl, line 2: JSON nested too deeply"):
        _read([tmp_path / "deep.jsonl"])
    (tmp_path / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800 half"}\n')
    with pytest.raises(MBCError, match=r"surrogate.jsonl, line 2 holds a lone surrogate"):
        _read([tmp_path / "surrogate.jsonl"])


def test_a_squad_file_nested_too_deep_gets_one_line(tmp_path):
    from mbc.data.loaders import load_squad

    (tmp_path / "deep.json").write_text('{"data": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(MBCError, match="nested too deeply"):
        load_squad(tmp_path / "deep.json")


def test_symlinked_folders_are_followed_once(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("Inside the linked folder.")
    (real / "loop").symlink_to(real, target_is_directory=True)  # a link back up
    top = tmp_path / "top"
    top.mkdir()
    (top / "linked").symlink_to(real, target_is_directory=True)
    texts, skipped = _read([top])
    assert texts == ["Inside the linked folder."]
    assert [reason for _, reason in skipped] == ["a link to a folder already read (a loop): read once"]


def test_passages_are_bounded_in_characters_where_a_long_word_is_one_token():
    """A WordPiece tokenizer reads a word over 100 characters as one unknown token: a 1 MB word
    would otherwise make passages of 254 x its pieces, each re-tokenized as it grew."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    passages = Passages(PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]"), max_tokens=64)
    cut = passages(Document("x" * 1_000_000))
    assert max(len(p.text) for p in cut) <= passages.piece_characters
    assert sum(len(p.text) for p in cut) == 1_000_000


def test_cutting_passages_is_linear_in_the_text():
    """A 1 MB line without a sentence end: the tokenizer sees bounded pieces, about the text once."""
    seen = []

    class Counting:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, text, **options):
            seen.append(len(text))
            return self.tokenizer(text, **options)

    passages = Passages(Counting(byte_tokenizer()), max_tokens=64)
    for text in ["x" * 1_000_000, "word " * 200_000]:
        seen.clear()
        cut = passages(Document(text))
        assert max(seen) <= 2 * passages.piece_characters  # a piece and the passage it joins, never the text
        assert sum(seen) <= 4 * len(text)  # each character tokenized a bounded number of times
        assert all(len(p.text) <= 64 for p in cut) and "".join(p.text for p in cut).replace(" ", "") == text.replace(
            " ", ""
        )


# ---- the bank -------------------------------------------------------------------------------------
def test_metadata_nested_too_deep_or_not_finite_is_refused(tmp_path):
    with _bank(tmp_path / "bank.db") as bank:
        deep = {}
        inner = deep
        for _ in range(MAX_METADATA_DEPTH):
            inner["x"] = {}
            inner = inner["x"]
        for metadata, message in [
            (deep, "nested more than 32 levels"),
            ({"x": math.nan}, "finite numbers"),
            ({"x": [1, math.inf]}, "finite numbers"),
        ]:
            with pytest.raises(MBCError, match=message):
                bank.add(["new"], np.zeros((1, 4, 1), np.uint8), [metadata])
        assert len(bank) == 3


def test_ids_and_offsets_beyond_64_bits_are_unknown_not_overflows(tmp_path):
    with _bank(tmp_path / "bank.db") as bank:
        for document_id in (10**30, -1, 2**63):
            with pytest.raises(MBCError, match=f"no document with id {document_id}"):
                bank.metadata(document_id)
            with pytest.raises(MBCError, match=f"no document with id {document_id}"):
                bank.remove(document_id)
        assert bank.listing(10**30) == [] and len(bank.listing(0, 10**30)) == 3
    for flag in ("--show", "--delete"):
        result = runner.invoke(app, ["bank", str(tmp_path / "bank.db"), flag, "9" * 30])
        assert result.exit_code != 0 and "no document with id" in str(result.exception), result.output


@pytest.mark.parametrize(
    "damage, commands, message",
    [
        ("UPDATE documents SET entry = CAST(entry AS TEXT) WHERE id = 2", ["--show", "2"], "fail their checksum"),
        ("UPDATE documents SET metadata = 'not json' WHERE id = 2", ["--list"], "metadata of document 2 is not"),
        ("UPDATE documents SET metadata = 'not json' WHERE id = 2", ["--show", "2"], "metadata of document 2 is not"),
        ("UPDATE documents SET metadata = '[1]' WHERE id = 2", ["--list"], "metadata of document 2 is not"),
    ],
)
def test_a_damaged_row_is_named_on_every_read_path(tmp_path, damage, commands, message):
    _bank(tmp_path / "bank.db").close()
    with sqlite3.connect(tmp_path / "bank.db") as connection:
        connection.execute(damage)
    result = runner.invoke(app, ["bank", str(tmp_path / "bank.db"), *commands])
    assert result.exit_code != 0 and isinstance(result.exception, MBCError), result.output
    assert message in str(result.exception)


def test_a_row_with_a_retyped_entry_can_be_deleted(tmp_path):
    _bank(tmp_path / "bank.db").close()
    with sqlite3.connect(tmp_path / "bank.db") as connection:
        connection.execute("UPDATE documents SET entry = CAST(entry AS TEXT) WHERE id = 2")
    result = runner.invoke(app, ["bank", str(tmp_path / "bank.db"), "--delete", "2"])
    assert result.exit_code == 0, result.output
    with MemoryBank.open_existing(tmp_path / "bank.db") as bank:
        assert bank.ids() == [1, 3] and bank.code_counts()[1].tolist() == [2 * 4]  # counted again


def test_a_bank_cut_short_gets_one_line_on_every_command(tmp_path):
    bank = _bank(tmp_path / "bank.db", count=400)
    bank.storage.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    bank.close()
    data = (tmp_path / "bank.db").read_bytes()
    (tmp_path / "bank.db").write_bytes(data[: int(len(data) * 0.99)])
    for commands in ([], ["--list"], ["--show", "399"], ["--delete", "1"]):
        result = runner.invoke(app, ["bank", str(tmp_path / "bank.db"), *commands])
        assert result.exit_code != 0 and isinstance(result.exception, MBCError), (commands, result.output)
        assert "damaged" in str(result.exception) and "\n" not in str(result.exception)


# ---- the Python API and the command line ------------------------------------------------------------
@pytest.fixture
def service(tiny_checkpoint, tmp_path):
    opened = MemoryService.open(tmp_path / "bank.db", tiny_checkpoint)
    opened.add([Document(text) for text in DOCUMENTS])
    yield opened
    opened.bank.close()


def test_long_questions_are_refused_before_any_model_work(service, tiny_checkpoint, tmp_path):
    calls = []
    tokenizer = service.model.llm.tokenizer
    service.model.llm.tokenizer = lambda text, **options: calls.append(len(text)) or tokenizer(text, **options)
    with pytest.raises(MBCError, match=r"question 1 is 100,000 characters long; .* at most 256 tokens"):
        service.ask(["Who?", "x" * 100_000])
    assert calls == [len("Who?")]  # the long one was never tokenized
    with pytest.raises(MBCError, match=rf"question 0 is {MAX_QUESTION_TOKENS + 1} tokens long"):
        service.ask(["y" * (MAX_QUESTION_TOKENS + 1)])  # the byte tokenizer: a token a character
    service.model.llm.tokenizer = tokenizer
    assert service.ask(["y" * MAX_QUESTION_TOKENS])["answers"][0]["answer"] is not None
    result = runner.invoke(app, ["ask", str(tmp_path / "bank.db"), "q" * 20_000, "--model", tiny_checkpoint])
    assert result.exit_code != 0 and "at most 256 tokens" in str(result.exception)


def test_lone_surrogates_are_refused_at_the_api(service):
    with pytest.raises(MBCError, match="lone surrogate"):
        service.add([Document("half \ud800 a character")])
    with pytest.raises(MBCError, match="lone surrogate"):
        service.ask(["why \udfff?"])
    assert len(service.bank) == len(DOCUMENTS)


def test_an_interrupted_add_reports_what_is_stored(service):
    def documents():
        for i in range(40):
            yield Document(f"Streamed document number {i}.")
        raise KeyboardInterrupt

    before, report = len(service.bank), AddReport()
    with pytest.raises(KeyboardInterrupt):
        service.add(documents(), None, report)
    assert report.added == len(service.bank) - before == 32  # two whole batches of 16; the rest was never stored


def test_ctrl_c_in_mbc_ingest_without_progress_bars_says_how_many_are_stored(tiny_checkpoint, tmp_path, monkeypatch):
    def interrupted(self):
        for i in range(40):
            yield Document(f"Streamed document number {i}.")
        raise KeyboardInterrupt

    monkeypatch.setattr(Sources, "__iter__", interrupted)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    (tmp_path / "any.txt").write_text("x")
    result = runner.invoke(
        app, ["ingest", str(tmp_path / "bank.db"), str(tmp_path / "any.txt"), "--model", tiny_checkpoint]
    )
    assert result.exit_code == 130
    with MemoryBank.open_existing(tmp_path / "bank.db") as bank:
        assert f"the first {len(bank)} passages read are in the bank ({len(bank)} added" in result.output
        assert len(bank) == 32


def test_a_training_csv_keeps_quoted_newlines_and_names_a_malformed_row(tmp_path):
    from mbc.data.loaders import load

    (tmp_path / "streaming.csv").write_text('text,question,answers\n"First line.\nSecond line.",What?,"[""x""]"\n')
    (row,) = load(str(tmp_path / "streaming.csv"))
    assert row.document == "First line.\nSecond line."
    (tmp_path / "open.csv").write_text('text,question,answers\n"never closed,q,a\n')
    with pytest.raises(MBCError, match=r"open.csv, line \d+: malformed CSV"):
        load(str(tmp_path / "open.csv"))

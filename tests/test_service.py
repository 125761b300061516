"""`mbc ingest`, `mbc ask`, `mbc bank` and the MemoryService under them, on a tiny model with
retrieval keys (conftest.tiny_checkpoint)."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import DOCUMENTS, MORE_DOCUMENTS, QUESTIONS
from typer.testing import CliRunner

from mbc.bank import MemoryBank
from mbc.cli import app
from mbc.errors import MBCError, NotFound
from mbc.memory import service as service_module
from mbc.memory.service import MemoryService
from mbc.memory.sources import Document

runner = CliRunner()


@pytest.fixture
def folder(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    for index, text in enumerate(DOCUMENTS + MORE_DOCUMENTS):
        (notes / f"{index:02d}.txt").write_text(text)
    return notes


def test_add_ask_list_delete(tiny_checkpoint, tmp_path):
    service = MemoryService.open(tmp_path / "bank.db", tiny_checkpoint)
    documents = [Document(text, {"path": f"doc{i}"}) for i, text in enumerate(DOCUMENTS)]
    report = service.add(documents)
    assert (report.added, report.duplicates, report.documents) == (3, 0, 3)
    again = service.add(documents[:2] + [Document("Something new.", {})])
    assert (again.added, again.duplicates) == (1, 2) and again.ids[:2] == report.ids[:2]
    result = service.ask(QUESTIONS)
    assert [a["question"] for a in result["answers"]] == QUESTIONS and result["seconds"] >= 0
    for item in result["answers"]:
        assert isinstance(item["answer"], str)
        (read,) = item["documents"]  # top-1 by retrieval key, with where it came from
        assert read["id"] in report.ids + again.ids and "added" in read["metadata"]
    listed = service.listing()
    assert [d["id"] for d in listed] == sorted(report.ids + again.ids[2:])
    assert listed[0]["metadata"]["path"] == "doc0" and listed[0]["metadata"]["characters"] == len(DOCUMENTS[0])
    service.delete(report.ids[0])
    assert service.stats()["documents"] == 3
    with pytest.raises(NotFound):
        service.document(report.ids[0])


def test_an_interrupted_ingest_keeps_what_it_reported_and_continues(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(service_module, "BATCH_SIZE", 4)
    texts = [f"Document {i} says the number {i * 7} belongs to {chr(65 + i % 26)}." for i in range(22)]

    def stream_then_killed():
        for i, text in enumerate(texts):
            if i == 11:
                raise KeyboardInterrupt  # Ctrl-C while reading the 12th document
            yield Document(text, {"i": i})

    class Progress:  # what the progress bar was told was stored
        stored = 0

        def update(self, n):
            self.stored += n

        def set_postfix(self, **_):
            pass

    service, progress = MemoryService.open(tmp_path / "bank.db", tiny_checkpoint), Progress()
    with pytest.raises(KeyboardInterrupt):
        service.add(stream_then_killed(), progress)
    assert progress.stored == 8 and len(service.bank) == 8  # two whole batches; the third never began
    rerun = MemoryService.open(tmp_path / "bank.db", tiny_checkpoint).add(Document(t, {}) for t in texts)
    assert (rerun.added, rerun.duplicates) == (14, 8)


def test_the_commands(tiny_checkpoint, folder, tmp_path):
    bank = str(tmp_path / "bank.db")
    result = runner.invoke(app, ["ingest", bank, str(folder), "--model", tiny_checkpoint])
    assert result.exit_code == 0, result.output
    assert "8 documents read as 8 passages: 8 added, 0 already stored" in result.stdout
    assert "8 documents, 3 bytes per document" in result.stdout  # 4 codes of 4 bits, a key of 4 pieces of 2 bits
    result = runner.invoke(app, ["ingest", bank, str(folder), "--model", tiny_checkpoint])
    assert "8 added" not in result.stdout and "0 added, 8 already stored" in result.stdout

    result = runner.invoke(app, ["ask", bank, *QUESTIONS, "--model", tiny_checkpoint, "--json"])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)["answers"]
    assert [a["question"] for a in answers] == QUESTIONS
    assert answers[0]["documents"][0]["metadata"]["path"].startswith(str(folder))
    result = runner.invoke(app, ["ask", bank, QUESTIONS[0], "--model", tiny_checkpoint])
    assert result.stdout.startswith(f"Q: {QUESTIONS[0]}\nA: ") and "read document " in result.stdout

    result = runner.invoke(app, ["bank", bank, "--list"])
    assert result.exit_code == 0 and result.stdout.count("00.txt") == 1 and len(result.stdout.splitlines()) == 8
    shown = json.loads(runner.invoke(app, ["bank", bank, "--show", "1", "--json"]).stdout)
    assert shown["metadata"]["path"].endswith("00.txt") and len(shown["entry"]) == 4  # K = 4 codes
    result = runner.invoke(app, ["bank", bank, "--delete", "1", "--json"])
    assert "deleted document 1" in result.stdout and json.loads(result.stdout.split("\n", 1)[1])["documents"] == 7


def test_the_commands_name_bad_input(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MBC_CACHE", str(tmp_path / "empty-cache"))
    bank = str(tmp_path / "bank.db")
    cases = [
        (["ingest", bank, str(tmp_path / "nope")], "no such file or folder"),
        (["ingest", bank, "-", "--stdin-format", "xml"], "choose lines or jsonl"),
        (["ingest", bank, "-"], "none cached: pass --model CHECKPOINT"),  # no model given, none trained
        (["ask", bank, "a question?", "--model", tiny_checkpoint], "no memory bank at"),
        (["ask", bank, "q?", "--decoding", "sampling"], "strategy"),
        (["bank", bank], "no memory bank at"),
    ]
    for arguments, message in cases:
        result = runner.invoke(app, arguments, input="a document\n")
        assert result.exit_code != 0 and isinstance(result.exception, MBCError), (arguments, result.output)
        assert message in str(result.exception), (arguments, str(result.exception))
    (tmp_path / "notes.txt").write_text("not a bank")
    result = runner.invoke(app, ["bank", str(tmp_path / "notes.txt")])
    assert "not a memory bank" in str(result.exception)
    runner.invoke(app, ["ingest", bank, "-", "--model", tiny_checkpoint], input="one document\n")
    result = runner.invoke(app, ["bank", bank, "--delete", "99"])
    assert isinstance(result.exception, NotFound) and "no document with id 99" in str(result.exception)
    assert len(MemoryBank.open_existing(bank)) == 1


def test_a_killed_ingest_is_continued_by_the_same_command(tiny_checkpoint, tmp_path):
    bank = tmp_path / "bank.db"
    lines = "".join(f"Note {i}: the lamp of room {i % 50} is {i % 7} years old.\n" for i in range(1000))
    command = [sys.executable, "-m", "mbc.cli", "ingest", str(bank), "-", "--model", tiny_checkpoint]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.stdin.write(lines.encode())
    process.stdin.close()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (bank.exists() and len(MemoryBank.open_existing(bank)) >= 32):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    with MemoryBank.open_existing(bank) as opened:
        stored = len(opened)
        assert 32 <= stored < 1000 and opened.entries().shape[0] == stored  # whole batches, every checksum good
    result = runner.invoke(app, ["ingest", str(bank), "-", "--model", tiny_checkpoint], input=lines)
    assert f"1000 documents read as 1000 passages: {1000 - stored} added, {stored} already stored" in result.stdout

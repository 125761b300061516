import io

import pytest
from conftest import byte_tokenizer

from mbc.errors import MBCError
from mbc.memory.sources import Document, Passages, Sources


def _texts(sources):
    return [(d.text, d.source) for d in sources]


def test_files_folders_records_and_stdin(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("  First note.\n")
    (tmp_path / "notes" / "sub").mkdir()
    (tmp_path / "notes" / "sub" / "b.md").write_text("# Second\n\nnote")
    (tmp_path / "notes" / "sub" / "skip.bin").write_bytes(b"\x00\x01")  # not a document suffix: ignored
    (tmp_path / "notes" / ".hidden").mkdir()
    (tmp_path / "notes" / ".hidden" / "c.txt").write_text("hidden")
    (tmp_path / "notes" / "empty.txt").write_text("   ")
    (tmp_path / "rows.jsonl").write_text('{"body": "row one"}\n\n{"body": "row two", "x": 1}\n')
    (tmp_path / "table.csv").write_text('id,body\n1,"a, quoted\nmultiline cell"\n2,\n3,third\n')
    stdin = io.StringIO("line one\n\nline two\n")
    sources = Sources(
        [str(tmp_path / "notes"), str(tmp_path / "rows.jsonl"), str(tmp_path / "table.csv"), "-"], "body", stdin=stdin
    )
    assert _texts(sources) == [
        ("First note.", {"path": str(tmp_path / "notes" / "a.txt")}),
        ("# Second\n\nnote", {"path": str(tmp_path / "notes" / "sub" / "b.md")}),
        ("row one", {"path": str(tmp_path / "rows.jsonl"), "line": 1}),
        ("row two", {"path": str(tmp_path / "rows.jsonl"), "line": 3}),
        ("a, quoted\nmultiline cell", {"path": str(tmp_path / "table.csv"), "row": 1}),
        ("third", {"path": str(tmp_path / "table.csv"), "row": 3}),
        ("line one", {"path": "<stdin>", "line": 1}),
        ("line two", {"path": "<stdin>", "line": 3}),
    ]


def test_stdin_as_json_lines():
    sources = Sources(["-"], stdin_format="jsonl", stdin=io.StringIO('{"text": "one"}\n{"text": "two"}\n'))
    assert [d.text for d in sources] == ["one", "two"]


def test_unreadable_files_are_skipped_and_named(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    sources = Sources([str(tmp_path)])
    assert [d.text for d in sources] == ["fine"]
    assert [(s.path, s.reason) for s in sources.skipped] == [(str(tmp_path / "latin1.txt"), "not UTF-8 text")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{not json\n', r"bad.jsonl, line 2: not JSON"),
        ("field.jsonl", '{"body": "ok"}\n', r"line 1: no string field 'text'.*--text-field"),
        ("list.jsonl", '["text"]\n', r"line 1: no string field 'text'"),
        ("cols.csv", "a,b\n1,2\n", r"has no column 'text' \(its columns: a, b\)"),
        ("empty.csv", "", r"has no column 'text' \(its columns: none\)"),
    ],
)
def test_bad_record_files_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(MBCError, match=message):
        list(Sources([str(tmp_path / name)]))


def test_bad_paths_and_options_are_refused_before_reading(tmp_path):
    with pytest.raises(MBCError, match="no such file or folder: .*missing.txt"):
        Sources([str(tmp_path / "missing.txt")])
    with pytest.raises(MBCError, match="at least one file"):
        Sources([])
    with pytest.raises(MBCError, match="choose lines or jsonl"):
        Sources(["-"], stdin_format="xml")


def test_long_documents_become_passages_that_fit_the_window():
    tokenizer = byte_tokenizer()  # one token per byte, no special tokens
    passages = Passages(tokenizer, max_tokens=40)
    short = Document("A short one.", {"path": "a.txt"})
    assert passages(short) == [short]
    sentences = [f"Sentence number {i} is here." for i in range(6)]  # 27-28 bytes each
    text = " ".join(sentences) + " " + "x" * 100  # and a 'sentence' longer than the window
    cut = passages(Document(text, {"path": "long.txt"}))
    assert all(len(p.text.encode()) <= 40 for p in cut)
    assert [p.source for p in cut] == [{"path": "long.txt", "passage": i, "passages": len(cut)} for i in range(1, 10)]
    assert [p.text for p in cut[:6]] == sentences  # whole sentences where they fit
    assert "".join(p.text for p in cut[6:]) == "x" * 100  # the rest cut at token boundaries, nothing lost

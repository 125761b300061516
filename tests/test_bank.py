import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from mbc import MBCError
from mbc.bank import BankLayout, MemoryBank, content_hash

LAYOUT = BankLayout("mbc", num_slots=4, stages=2, codebook_size=512, dim=8, fingerprint="abc")
MAC = BankLayout("mac", num_slots=4, stages=1, codebook_size=512, dim=8, fingerprint="def")


def random_entries(count: int, layout: BankLayout = LAYOUT, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if layout.mode == "mac":
        return rng.standard_normal((count, *layout.entry_shape)).astype(np.float32)
    return rng.integers(0, layout.codebook_size, (count, *layout.entry_shape)).astype(np.uint16)


def test_entries_round_trip_and_survive_reopening(bank_address):
    entries = random_entries(5)
    with MemoryBank.open(bank_address("bank"), LAYOUT) as bank:
        added = bank.add([f"doc {i}" for i in range(5)], entries, [{"source": i} for i in range(5)])
        assert [a.new for a in added] == [True] * 5
    with MemoryBank.open(bank_address("bank"), LAYOUT) as bank:
        assert len(bank) == 5
        np.testing.assert_array_equal(bank.entries(), entries)
        np.testing.assert_array_equal(bank.entries([added[3].id, added[1].id]), entries[[3, 1]])
        assert bank.metadata(added[2].id) == {"source": 2}


def test_mac_entries_round_trip(bank_address):
    entries = random_entries(3, MAC)
    with MemoryBank.open(bank_address("mac"), MAC) as bank:
        bank.add(["a", "b", "c"], entries)
        np.testing.assert_array_equal(bank.entries(), entries)
        assert bank.sizes()["entry_bytes"] == 3 * 4 * 8 * 4
        with pytest.raises(MBCError, match="only for an MBC"):
            bank.code_counts()


def test_same_content_is_stored_once(bank_address):
    with MemoryBank.open(bank_address("bank"), LAYOUT) as bank:
        first = bank.add(["alpha", "beta", "alpha"], random_entries(3))
        again = bank.add(["beta"], random_entries(1, seed=1))
        assert [a.new for a in first] == [True, True, False] and first[2].id == first[0].id
        assert again[0].id == first[1].id and not again[0].new
        assert len(bank) == 2
        assert bank.known(["alpha", "gamma"]) == {content_hash("alpha"): first[0].id}


def test_code_counts_follow_adds_and_removes(bank_address):
    entries = random_entries(6)
    with MemoryBank.open(bank_address("bank"), LAYOUT) as bank:
        ids = [a.id for a in bank.add([str(i) for i in range(6)], entries)]
        bank.remove(ids[2])

        def expected(rows):
            tuples, counts = np.unique(rows.reshape(-1, 2), axis=0, return_counts=True)
            return {tuple(t): c for t, c in zip(tuples.tolist(), counts.tolist())}

        codes, counts = bank.code_counts()
        assert {tuple(c): n for c, n in zip(codes.tolist(), counts.tolist())} == expected(entries[[0, 1, 3, 4, 5]])
    with MemoryBank.open(bank_address("bank"), LAYOUT) as bank:  # the counts are on disk too
        codes, counts = bank.code_counts()
        assert counts.sum() == 5 * 4


def test_bank_refuses_another_codebook(bank_address):
    MemoryBank.open(bank_address("bank"), LAYOUT).close()
    other = BankLayout(**{**LAYOUT.__dict__, "fingerprint": "xyz"})
    with pytest.raises(MBCError, match="fingerprint"):
        MemoryBank.open(bank_address("bank"), other)
    wider = BankLayout(**{**LAYOUT.__dict__, "num_slots": 6})
    with pytest.raises(MBCError, match="layout"):
        MemoryBank.open(bank_address("bank"), wider)


def test_bad_input_gets_clear_errors_and_writes_nothing(tmp_path):
    (tmp_path / "not-a-bank.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MBCError, match="not a memory bank"):
        MemoryBank.open(tmp_path / "not-a-bank.db", LAYOUT)
    with MemoryBank.open(tmp_path / "bank.db", LAYOUT) as bank:
        with pytest.raises(MBCError, match="shape"):
            bank.add(["a", "b"], random_entries(2)[:, :2])
        with pytest.raises(MBCError, match="out of range"):
            bank.add(["a"], np.full((1, 4, 2), 600, dtype=np.uint16))
        with pytest.raises(MBCError, match="JSON"):
            bank.add(["a"], random_entries(1), [{"when": object()}])
        assert len(bank) == 0


def test_sizes_account_for_entries_codebook_and_mac(bank_address):
    with MemoryBank.open(bank_address("bank"), LAYOUT) as bank:
        bank.add(["a", "b"], random_entries(2))
        sizes = bank.sizes()
    assert (
        sizes["entry_bytes"] == sizes["stored_bytes"] == 2 * 9
    )  # 8 indices x 9 bits = 72 bits = 9 bytes per document; no keys
    assert sizes["codebook_bytes"] == 2 * 512 * 8 * 4
    assert sizes["mac_equivalent_bytes"] == 2 * 4 * 8 * 4


WRITER = """
import sys, numpy as np
from mbc.bank import BankLayout, MemoryBank
layout = BankLayout("mbc", num_slots=4, stages=2, codebook_size=512, dim=8, fingerprint="abc")
bank = MemoryBank.open(sys.argv[1], layout)
rng = np.random.default_rng(0)
for i in range(100000):
    texts = [f"document {i} part {j}" for j in range(20)]
    bank.add(texts, rng.integers(0, 512, (20, 4, 2)).astype(np.uint16))
    print(i, flush=True)
"""


def test_a_process_killed_mid_ingest_leaves_only_whole_documents(bank_address):
    path = bank_address("bank")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    committed = -1
    deadline = time.time() + 60
    while committed < 30 and time.time() < deadline:  # let it commit a few batches, then kill it mid-stream
        committed = int(writer.stdout.readline())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert committed >= 30
    if not path.startswith("postgresql://"):
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with MemoryBank.open(path, LAYOUT) as bank:
        count = len(bank)
        assert count % 20 == 0 and count >= 20 * (committed + 1)  # whole batches only, every reported one kept
        entries = bank.entries()
        assert entries.shape == (count, 4, 2)
        codes, counts = bank.code_counts()
        assert counts.sum() == count * 4  # counts agree with the rows
        bank.add(["after the crash"], random_entries(1))  # and the bank takes new documents
        assert len(bank) == count + 1


KEYED = BankLayout(
    "mbc", num_slots=4, stages=1, codebook_size=512, dim=8, fingerprint="abc", key_pieces=8, key_codes=256
)


def test_retrieval_keys_round_trip_and_are_required_by_a_keyed_bank(bank_address):
    keys = np.random.default_rng(1).integers(0, 256, (4, 8)).astype(np.uint8)
    texts = [f"doc {i}" for i in range(4)]
    with MemoryBank.open(bank_address("keyed"), KEYED) as bank:
        with pytest.raises(MBCError, match="needs keys="):
            bank.add(texts, random_entries(4, KEYED))
        with pytest.raises(MBCError, match=r"shape \(8,\)"):
            bank.add(texts, random_entries(4, KEYED), keys=keys[:, :5])
        assert len(bank) == 0
        added = bank.add(texts, random_entries(4, KEYED), keys=keys)
        np.testing.assert_array_equal(bank.retrieval_keys(), keys)
        np.testing.assert_array_equal(bank.retrieval_keys([added[2].id, added[0].id]), keys[[2, 0]])
        assert bank.sizes()["key_bytes"] == 4 * 8
    with MemoryBank.open(bank_address("plain"), LAYOUT) as bank:
        with pytest.raises(MBCError, match="stores no retrieval keys"):
            bank.add(texts, random_entries(4), keys=keys)
        with pytest.raises(MBCError, match="stores no retrieval keys"):
            bank.retrieval_keys()
    with pytest.raises(MBCError, match="another bank layout"):
        MemoryBank.open(bank_address("keyed"), BankLayout(**{**KEYED.__dict__, "key_pieces": 4}))


def test_a_format_1_bank_is_upgraded_on_opening(tmp_path):
    path = tmp_path / "old.db"
    with MemoryBank.open(path, LAYOUT) as bank:
        bank.add(["old doc"], random_entries(1))
    # What format 1 looked like: no retrieval_key or checksum column, no key fields in the stored layout.
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("ALTER TABLE documents DROP COLUMN retrieval_key")
        connection.execute("ALTER TABLE documents DROP COLUMN checksum")
        old_layout = {k: v for k, v in LAYOUT.__dict__.items() if not k.startswith("key_")}
        connection.execute("UPDATE meta SET value = ? WHERE key = 'layout'", (json.dumps(old_layout, sort_keys=True),))
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
    connection.close()
    with MemoryBank.open(path, LAYOUT) as bank:
        assert len(bank) == 1
        bank.add(["new doc"], random_entries(1, seed=2))
        assert len(bank.entries()) == 2


# ---- several writers, stale objects, foreign and damaged files -------------------------------------

APPENDER = """
import sys, time, numpy as np
from pathlib import Path
from mbc.bank import BankLayout, MemoryBank
layout = BankLayout("mbc", num_slots=4, stages=2, codebook_size=512, dim=8, fingerprint="abc")
name, batches, go = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
rng = np.random.default_rng(abs(hash(name)) % 1000)
with MemoryBank.open(sys.argv[1], layout) as bank:
    print("open", flush=True)
    while not go.exists():  # both writers hold the bank open before either writes
        time.sleep(0.01)
    for i in range(batches):
        # few distinct codes, so both writers touch the same counts
        bank.add([f"{name} {i} {j}" for j in range(5)], rng.integers(0, 4, (5, 4, 2)).astype(np.uint16))
"""


def _stored_counts_agree_with_rows(path) -> tuple[int, int]:
    with MemoryBank.open(path, LAYOUT) as bank:
        rows = len(bank)
        tuples, expected = np.unique(bank.entries().reshape(-1, 2), axis=0, return_counts=True)
        codes, counts = bank.code_counts()
        assert {tuple(c): n for c, n in zip(codes.tolist(), counts.tolist())} == {
            tuple(t): n for t, n in zip(tuples.tolist(), expected.tolist())
        }
        return rows, int(counts.sum())


def test_two_processes_appending_keep_the_code_counts_right(bank_address, tmp_path):
    path = bank_address("bank")
    MemoryBank.open(path, LAYOUT).close()
    go = tmp_path / "go"
    writers = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(path), name, "60", str(go)], stdout=subprocess.PIPE)
        for name in ("first", "second")
    ]
    assert [w.stdout.readline() for w in writers] == [b"open\n"] * 2
    go.touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    rows, vectors = _stored_counts_agree_with_rows(path)
    assert rows == 2 * 60 * 5 and vectors == rows * 4


def test_a_bank_opened_earlier_sees_what_another_writer_added(bank_address):
    path = bank_address("bank")
    early = MemoryBank.open(path, LAYOUT)
    early.add(["early"], random_entries(1))
    version = early.version
    with MemoryBank.open(path, LAYOUT) as other:
        other.add([f"other {i}" for i in range(3)], random_entries(3, seed=5))
    assert early.version != version  # readers rebuild on this
    assert len(early) == 4 and early.code_counts()[1].sum() == 4 * 4
    early.add(["early again"], random_entries(1, seed=6))  # must not write its old counts back
    early.close()
    assert _stored_counts_agree_with_rows(path) == (5, 5 * 4)


def test_a_sqlite_file_that_is_not_a_bank_is_refused_untouched(tmp_path):
    path = tmp_path / "people.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE people (name TEXT)")
        connection.execute("INSERT INTO people VALUES ('Ada')")
    connection.close()
    before = path.read_bytes()
    with pytest.raises(MBCError, match="not a memory bank"):
        MemoryBank.open(path, LAYOUT)
    assert path.read_bytes() == before
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert tables == [("people",)]


def _bank_with(path, count=3) -> None:
    with MemoryBank.open(path, LAYOUT) as bank:
        bank.add([f"doc {i}" for i in range(count)], random_entries(count))


def _sql(address, statement: str, *args) -> None:
    """A statement run on the bank's storage behind its back (``?`` placeholders on either)."""
    if str(address).startswith("postgresql://"):
        import psycopg

        from mbc.bank.postgres import split_url

        url, schema, _ = split_url(address)
        with psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}") as connection:
            connection.execute(statement.replace("?", "%s"), args)
        return
    connection = sqlite3.connect(address)
    with connection:
        connection.execute(statement, args)
    connection.close()


def test_damaged_banks_are_reported_in_one_line(bank_address):
    path = bank_address("bank")
    _bank_with(path)
    # A changed byte inside a stored entry: read as other codes unless the checksum catches it.
    _sql(path, "UPDATE documents SET entry = ? WHERE id = 2", bytes(9))
    with MemoryBank.open(path, LAYOUT) as bank:
        assert len(bank) == 3
        with pytest.raises(MBCError, match=r"damaged: the stored bytes of documents \[2\] fail their checksum"):
            bank.entries()
        bank.remove(2)  # the way out the message names
        assert bank.entries().shape == (2, 4, 2)
    _sql(path, "UPDATE meta SET value = '{not json' WHERE key = 'layout'")
    with pytest.raises(MBCError, match="stored layout is not readable"):
        MemoryBank.open(path, LAYOUT)
    _sql(path, "DELETE FROM meta WHERE key = 'layout'")
    with pytest.raises(MBCError, match="meta table lacks"):
        MemoryBank.open(path, LAYOUT)


def test_a_truncated_bank_file_is_reported_as_damaged(tmp_path):
    path = tmp_path / "bank.db"
    with MemoryBank.open(path, LAYOUT) as bank:
        for i in range(40):
            bank.add([f"doc {i} {j}" for j in range(50)], random_entries(50, seed=i))
    _sql(path, "PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(MBCError, match="damaged"):
        with MemoryBank.open(path, LAYOUT) as bank:
            bank.entries()


def test_a_full_disk_stores_nothing_and_says_so(tmp_path):
    path = tmp_path / "bank.db"
    _bank_with(path)
    with MemoryBank.open(path, LAYOUT) as bank:
        pages = bank.storage.execute("PRAGMA page_count").fetchone()[0]
        bank.storage.execute(f"PRAGMA max_page_count = {pages}")  # the file may not grow: as a full disk
        texts = [f"big {i}" for i in range(2000)]
        with pytest.raises(MBCError, match="the disk is full; nothing of this change was stored"):
            bank.add(texts, random_entries(2000), [{"padding": "x" * 200}] * 2000)
        assert len(bank) == 3
    assert _stored_counts_agree_with_rows(path) == (3, 3 * 4)


def test_unusable_bank_paths_get_one_line(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(MBCError, match="cannot create the folder"):
        MemoryBank.open(tmp_path / "file" / "bank.db", LAYOUT)
    with pytest.raises(MBCError, match="is a folder"):
        MemoryBank.open(tmp_path, LAYOUT)
    if os.geteuid() != 0:  # root writes through file permissions
        path = tmp_path / "bank.db"
        _bank_with(path)
        path.chmod(0o444)
        with pytest.raises(MBCError, match="cannot be written"):
            with MemoryBank.open(path, LAYOUT) as bank:
                bank.add(["new"], random_entries(1))

"""What only a PostgreSQL bank has: its URL, a server that is away or refuses, a schema that holds
something else, a server killed mid-stream, copies between the two storages. What both storages
share is tested once, on both, in test_bank.py."""

import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import start_postgres
from test_bank import LAYOUT, MAC, _stored_counts_agree_with_rows, random_entries

from mbc import MBCError
from mbc.bank import MemoryBank
from mbc.cli import app


def test_a_schema_that_is_not_a_bank_is_refused_untouched(postgres_server):
    with psycopg.connect(postgres_server.url, autocommit=True) as connection:
        connection.execute("CREATE SCHEMA people")
        connection.execute("CREATE TABLE people.people (name TEXT)")
        connection.execute("INSERT INTO people.people VALUES ('Ada')")
    with pytest.raises(MBCError, match=r"not a memory bank's \(its tables: people\)"):
        MemoryBank.open(f"{postgres_server.url}?bank=people", LAYOUT)
    with psycopg.connect(postgres_server.url) as connection:
        tables = connection.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'people'")
        assert tables.fetchall() == [("people",)]
        assert connection.execute("SELECT name FROM people.people").fetchall() == [("Ada",)]


def test_unreachable_refusing_and_wrong_addresses_get_one_line(postgres_server):
    parts = urlsplit(postgres_server.url)
    closed_port = postgres_server.url.replace(f":{parts.port}/", ":9/")
    with pytest.raises(MBCError, match="cannot reach the PostgreSQL server") as error:
        MemoryBank.open(closed_port, LAYOUT)
    assert "\n" not in str(error.value)
    wrong_password = postgres_server.url.replace(":mbc@", ":not-the-password@")
    with pytest.raises(MBCError, match="refused the user name or password") as error:
        MemoryBank.open(wrong_password, LAYOUT)
    assert "not-the-password" not in str(error.value)  # messages never show a password
    with pytest.raises(MBCError, match="does not exist; create it"):
        MemoryBank.open(postgres_server.url.rsplit("/", 1)[0] + "/nowhere", LAYOUT)
    with pytest.raises(MBCError, match="is not usable"):
        MemoryBank.open(f"{postgres_server.url}?bank=Robert');DROP", LAYOUT)
    with pytest.raises(MBCError, match="no memory bank at"):
        MemoryBank.open_existing(f"{postgres_server.url}?bank=never_made")


WRITER = """
import sys, time, numpy as np
from mbc import MBCError
from mbc.bank import BankLayout, MemoryBank
layout = BankLayout("mbc", num_slots=4, stages=2, codebook_size=512, dim=8, fingerprint="abc")
bank = MemoryBank.open(sys.argv[1], layout)
rng = np.random.default_rng(0)
for i in range(100000):
    entries = rng.integers(0, 512, (20, 4, 2)).astype(np.uint16)
    while True:  # a batch the server did not acknowledge is sent again, as a client would
        try:
            bank.add([f"document {i} part {j}" for j in range(20)], entries)
            break
        except MBCError:
            time.sleep(0.05)
    print(i, flush=True)
"""


def _acknowledged(writer, at_least: int, timeout: float = 60) -> int:
    last, deadline = -1, time.time() + timeout
    while last < at_least and time.time() < deadline:
        last = int(writer.stdout.readline())
    assert last >= at_least, "the writer stopped acknowledging"
    return last


def test_a_server_killed_mid_stream_keeps_every_acknowledged_add(tmp_path):
    server = start_postgres(tmp_path / "postgres")
    address = f"{server.url}?bank=stream"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, address], stdout=subprocess.PIPE, text=True)
    try:
        _acknowledged(writer, 10)
        server.kill()  # SIGKILL mid-stream: an add may be half-way through its transaction
        time.sleep(0.5)
        server.start()
        last = _acknowledged(writer, 30)  # the writer reconnects and goes on
        writer.kill()
        writer.wait()
        with MemoryBank.open(address, LAYOUT) as bank:
            stored = set(bank.known([f"document {i} part {j}" for i in range(last + 1) for j in range(20)]))
            assert len(stored) == 20 * (last + 1)  # every acknowledged batch, whole
            assert len(bank) % 20 == 0  # and no part of any other
        _stored_counts_agree_with_rows(address)  # counts equal a recount
    finally:
        writer.kill()
        server.stop()


def test_banks_copy_between_storages_with_ids_and_counts(tmp_path, postgres_server):
    file_bank = tmp_path / "bank.db"
    with MemoryBank.open(file_bank, LAYOUT) as bank:
        ids = [a.id for a in bank.add([f"doc {i}" for i in range(6)], random_entries(6), [{"i": i} for i in range(6)])]
        bank.remove(ids[1])  # ids with a gap: the copy keeps them
        expected = bank.digest()
    url = f"{postgres_server.url}?bank=copied"
    with MemoryBank.open_existing(file_bank) as source, source.copy_to(url) as copied:
        assert copied.ids() == [i for i in ids if i != ids[1]] and copied.digest() == expected
        assert copied.add(["after the copy"], random_entries(1, seed=3))[0].id == ids[-1] + 1
    with MemoryBank.open_existing(url) as source, source.copy_to(tmp_path / "back.db") as back:
        assert back.metadata(ids[2]) == {"i": 2} and len(back) == 6
        with pytest.raises(MBCError, match="already holds 6 documents"):
            source.copy_to(tmp_path / "back.db")
        MemoryBank.open(f"{postgres_server.url}?bank=mac_bank", MAC).close()
        with pytest.raises(MBCError, match="fingerprint"):  # the destination's model must be the source's
            source.copy_to(f"{postgres_server.url}?bank=mac_bank")


def test_mbc_bank_copies_and_lists_a_postgres_bank(tmp_path, postgres_server):
    from typer.testing import CliRunner

    file_bank = tmp_path / "bank.db"
    with MemoryBank.open(file_bank, LAYOUT) as bank:
        bank.add(["one", "two"], random_entries(2), [{"path": "one.txt"}, {"path": "two.txt"}])
    url = f"{postgres_server.url}?bank=from_cli"
    runner = CliRunner()
    copied = runner.invoke(app, ["bank", str(file_bank), "--copy-to", url])
    assert copied.exit_code == 0, copied.output
    assert "copied 2 documents" in copied.output and ":***@" in copied.output
    listed = runner.invoke(app, ["bank", url, "--list"])
    assert listed.exit_code == 0 and "one.txt" in listed.output and "two.txt" in listed.output


def test_the_storage_bench_runs_on_both_storages(postgres_server):
    bench = Path(__file__).resolve().parents[1] / "bench" / "storage.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--documents", "40", "--bank", postgres_server.url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("SQLite", "PostgreSQL"))]
    assert [r[-4] for r in rows] == ["49", "49"]  # 17 bytes of codes + 32 of retrieval key, on either

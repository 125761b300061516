"""The bank's storage in one SQLite file: the default, nothing to install, right on one machine.

A ``Storage`` (store.py) runs the bank's SQL and says what its errors mean. This one keeps the bank
in a file with a WAL journal and ``synchronous=FULL``; a write transaction takes the write lock
before it reads (``BEGIN IMMEDIATE``), so writers in several processes take turns. SQLite's
``data_version`` changes when another connection commits, which is how readers notice other
writers. SQLite's locking is not safe over network file systems: banks shared between machines
belong on PostgreSQL (postgres.py).
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from mbc.errors import MBCError

SQLITE_HEADER = b"SQLite format 3\x00"
LOCK_TIMEOUT_SECONDS = 60

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash TEXT NOT NULL UNIQUE,
    entry BLOB NOT NULL,
    metadata TEXT NOT NULL,
    retrieval_key BLOB,
    checksum INTEGER NOT NULL
);
CREATE TABLE code_counts (vector_key INTEGER PRIMARY KEY, count INTEGER NOT NULL);
"""


class SQLiteStorage:
    errors = (sqlite3.Error,)

    def __init__(self, connection: sqlite3.Connection, path: Path):
        self.connection, self.path = connection, path
        self.address = str(path)

    @classmethod
    def open(cls, path: str | Path, create: bool) -> "SQLiteStorage":
        """The file at ``path``; a missing one is made only when ``create``. Refuses, untouched, a
        folder, a file that is not SQLite and one cut short."""
        path = Path(path)
        if not create and not path.is_file():
            raise MBCError(f"no memory bank at {path}: make one with `mbc ingest {path} FILES...`")
        if path.is_dir():
            raise MBCError(f"{path} is a folder; a memory bank is a single SQLite file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MBCError(f"cannot create the folder for the bank {path}: {error.strerror}") from error
        if path.exists() and path.stat().st_size and path.open("rb").read(16) != SQLITE_HEADER:
            raise MBCError(f"{path} is not a memory bank (not an SQLite file); give a new file name for a new bank")
        _refuse_truncated(path)
        try:
            return cls(sqlite3.connect(path, timeout=LOCK_TIMEOUT_SECONDS, isolation_level=None), path)
        except sqlite3.Error as error:
            raise MBCError(explain(path, error)) from error

    @classmethod
    def in_memory(cls) -> "SQLiteStorage":
        return cls(sqlite3.connect(":memory:", isolation_level=None), Path(":memory:"))

    def after_opening(self) -> None:
        """Once the file is known to be a bank (a foreign file is left as it was)."""
        if self.address != ":memory:":
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA synchronous=FULL")

    def execute(self, sql: str, parameters=()) -> sqlite3.Cursor:
        return self.connection.execute(sql, parameters)

    def executemany(self, sql: str, rows) -> None:
        self.connection.executemany(sql, rows)

    @contextmanager
    def transaction(self):
        # IMMEDIATE: the write lock is taken before anything is read, so no other writer can change
        # what this transaction's checks and counts are based on.
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.connection.execute("COMMIT")
        except BaseException:
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
            raise

    def tables(self) -> set[str]:
        rows = self.connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
        return {row[0] for row in rows}

    def create_tables(self) -> None:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self.connection.execute(statement)

    def changed(self) -> None:
        """Inside a write transaction: nothing to do, SQLite's data_version counts commits."""

    def version(self) -> int:
        return self.connection.execute("PRAGMA data_version").fetchone()[0]

    def ids_taken(self) -> None:
        """After rows were inserted with their own ids: AUTOINCREMENT follows them by itself."""

    def disk_bytes(self) -> int:
        if self.address == ":memory:":
            return 0
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def explain(self, error: sqlite3.Error) -> MBCError:
        return MBCError(explain(self.path, error))

    def close(self) -> None:
        self.connection.close()


def explain(path: Path, error: sqlite3.Error) -> str:
    """One line for what SQLite reports, naming the file and what to do."""
    text = str(error)
    if "full" in text:
        return f"{path}: the disk is full; nothing of this change was stored. Free some space and try again"
    if "readonly" in text:
        return f"{path} cannot be written (read-only file or folder): give write permission, or copy the bank elsewhere"
    if "locked" in text or "busy" in text:
        return f"{path} stayed locked by another process for over {LOCK_TIMEOUT_SECONDS} s; try again when it is done"
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return f"{path} is damaged ({text}): restore it from a copy, or start a new bank file"
    if "unable to open" in text:
        return f"{path} cannot be opened ({text}): check that its folder exists and can be written"
    return f"{path}: SQLite error: {text}"


def _refuse_truncated(path: Path, looks: int = 3) -> None:
    """A file shorter than the pages its SQLite header counts was cut (a copy or a disk that ran
    out): SQLite reads the missing pages as absent rows without a word, so it is refused here. A
    checkpoint of another process writes the header's page before the pages that extend the file,
    so the shortfall must still be there after a few looks 0.1 s apart."""
    for look in range(looks):
        shortfall = _missing_bytes(path)
        if not shortfall:
            return
        if look < looks - 1:
            time.sleep(0.1)
    raise MBCError(
        f"{path} is damaged: it is {shortfall:,} bytes shorter than its SQLite header says (it was cut short); "
        "restore it from a copy"
    )


def _missing_bytes(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            header, size = handle.read(100), os.fstat(handle.fileno()).st_size
    except OSError:
        return 0  # nothing to check: opening it will say what is wrong
    if len(header) < 100:
        return 0
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages, counter, valid_for = (int.from_bytes(header[i : i + 4], "big") for i in (28, 24, 92))
    if counter != valid_for:  # an old writer left the count stale: it says nothing
        return 0
    return max(0, pages * page_size - size)

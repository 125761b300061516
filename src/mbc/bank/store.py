"""The memory bank on disk: one SQLite file that outlives the process.

Each stored document is one row: an id, the SHA-256 of its text (so re-adding the same content is
detected), its entry (MBC: the K code indices, bit-packed; MAC: K float32 vectors), its retrieval
key when the model has one (a few bit-packed product-quantizer indices, network/retrieval.py) and JSON
metadata. Beside the rows the file keeps:

- ``meta``: the bank's layout (mode, K, stages, codebook size, width) and the fingerprint of the
  model that wrote it. Stored indices mean nothing under another codebook, so a bank refuses to be
  opened with a model whose fingerprint differs.
- ``code_counts`` (MBC): how often each stored vector (a code, or a tuple of codes with residual
  stages) occurs in the bank, kept in the same transaction as the rows. Answering reads these
  counts, not the rows: its cost depends on the codebook, not on the number of documents.

Durability: every ``add`` and ``remove`` is one SQLite transaction (WAL journal, synchronous=FULL)
that takes the write lock before it reads, and changes the counts by what it adds or removes, so
several processes may write to one bank. A process killed mid-ingest leaves every document whose
``add`` returned, and no part of any other. Each row carries a CRC-32 of its stored bytes, checked
whenever they are read, so a damaged file is reported rather than read as other codes. A bank
object notices what other processes wrote (``version`` follows SQLite's ``data_version``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import time
import zlib
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np

from mbc.bank.layout import BankLayout
from mbc.errors import MBCError, NotFound, check_texts

# 2: documents gained the retrieval_key column; 3: and a checksum. Older files are upgraded on opening.
FORMAT_VERSION = 3
SQLITE_HEADER = b"SQLite format 3\x00"
BANK_TABLES = {"meta", "documents", "code_counts"}
LOCK_TIMEOUT_SECONDS = 60


_MEANING = {"mbc": "codebook", "mac": "amortization network", "tokens": "token scorer"}  # fixes what an entry means


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Added:
    id: int
    new: bool  # False: the same content was already in the bank (under this id)


_SCHEMA = """
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


MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger id or offset names no row
MAX_METADATA_DEPTH = 32  # nesting of lists and objects in a document's metadata


def checksum(entry: bytes, key: bytes | None) -> int:
    """CRC-32 of a row's stored bytes; -1 (never a CRC) for a column that no longer holds bytes."""
    if not isinstance(entry, bytes) or not isinstance(key, (bytes, type(None))):
        return -1
    return zlib.crc32(entry + (key or b""))


def check_metadata(record) -> dict:
    """``record`` if it is an object nested at most ``MAX_METADATA_DEPTH`` deep (lists and objects
    inside it), else one line; ``metadata_json`` then refuses what JSON cannot hold."""
    if not isinstance(record, dict):
        raise MBCError(f"each document's metadata must be a dict, got {type(record).__name__}")
    level, depth = [record], 1
    while level:
        if depth > MAX_METADATA_DEPTH:
            raise MBCError(f"document metadata is nested more than {MAX_METADATA_DEPTH} levels deep; flatten it")
        children = []
        for value in level:
            items = value.values() if isinstance(value, dict) else value
            children += [v for v in items if isinstance(v, (dict, list, tuple))]
        level, depth = children, depth + 1
    return record


def metadata_json(record) -> str:
    """``record`` as the bank stores it (``check_metadata``), refusing NaN and infinities, which
    JSON cannot hold (they would come back as something else)."""
    try:
        return json.dumps(check_metadata(record), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise MBCError(f"document metadata must be JSON (strings, finite numbers, lists, dicts): {error}") from error


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


def _explain(path: Path, error: sqlite3.Error) -> str:
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


def _guarded(method):
    """SQLite's errors reach the caller as one MBCError line naming the bank."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as error:
            raise MBCError(_explain(self.path, error)) from error

    return wrapper


class MemoryBank:
    """A durable bank of compressed documents. Open with ``MemoryBank.open(path, layout)``."""

    def __init__(self, connection: sqlite3.Connection, layout: BankLayout, path: Path):
        self.connection, self.layout, self.path = connection, layout, path
        self._changes = 0  # by this object; SQLite's data_version counts the other connections'

    @classmethod
    def open(cls, path: str | Path, layout: BankLayout | None) -> "MemoryBank":
        """Open the bank at ``path`` (created if missing) for a model of this layout. A file that is
        not a bank, or a bank written for another model, is refused untouched. ``layout=None``: an
        existing bank in the layout stored in it (listing, sizes and deleting need no model)."""
        path = Path(path)
        if layout is None and not path.is_file():
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
            connection = sqlite3.connect(path, timeout=LOCK_TIMEOUT_SECONDS, isolation_level=None)
            bank = cls(connection, layout, path)
            stored = bank._create_or_read_meta()
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            if stored["format_version"] in ("1", "2"):
                stored["format_version"] = bank._upgrade(stored["format_version"])
        except sqlite3.Error as error:
            raise MBCError(_explain(path, error)) from error
        if layout is None:
            bank.layout = cls._stored_layout(path, stored)
        else:
            cls._check_layout(path, stored, layout)
        return bank

    @classmethod
    def open_existing(cls, path: str | Path) -> "MemoryBank":
        """An existing bank, in the layout stored in it (``open(path, None)``)."""
        return cls.open(path, None)

    @classmethod
    def in_memory(cls, layout: BankLayout) -> "MemoryBank":
        """A bank that lives only as long as this object (validation reads one, through the same
        readers as a bank on disk)."""
        bank = cls(sqlite3.connect(":memory:", isolation_level=None), layout, Path(":memory:"))
        bank._create_or_read_meta()
        return bank

    @contextmanager
    def _transaction(self):
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

    def _create_or_read_meta(self) -> dict:
        """A new (empty) file becomes a bank of this layout; any other SQLite file must already be one."""
        with self._transaction():
            tables = {
                row[0]
                for row in self.connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                )
            }
            if not tables and self.layout is None:
                raise MBCError(f"no memory bank at {self.path}: make one with `mbc ingest {self.path} FILES...`")
            if not tables:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.connection.execute(statement)
                wanted = {
                    "format_version": str(FORMAT_VERSION),
                    "layout": json.dumps(self.layout.__dict__, sort_keys=True),
                }
                self.connection.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())
        if not BANK_TABLES <= tables and tables:
            raise MBCError(
                f"{self.path} is an SQLite database but not a memory bank (its tables: {', '.join(sorted(tables))}); "
                "it was left untouched: give a new file name for a new bank"
            )
        stored = dict(self.connection.execute("SELECT key, value FROM meta").fetchall())
        if "format_version" not in stored or "layout" not in stored:
            raise MBCError(
                f"{self.path} is damaged: its meta table lacks the bank format or layout; restore it from a copy"
            )
        return stored

    def _upgrade(self, version: str) -> str:
        with self._transaction():
            if version == "1":
                self.connection.execute("ALTER TABLE documents ADD COLUMN retrieval_key BLOB")
            self.connection.execute("ALTER TABLE documents ADD COLUMN checksum INTEGER NOT NULL DEFAULT 0")
            rows = self.connection.execute("SELECT id, entry, retrieval_key FROM documents").fetchall()
            self.connection.executemany(
                "UPDATE documents SET checksum = ? WHERE id = ?", [(checksum(e, k), i) for i, e, k in rows]
            )
            self.connection.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION),))
        return str(FORMAT_VERSION)

    @staticmethod
    def _stored_layout(path: Path, stored: dict) -> BankLayout:
        """The layout a bank file records (fields added since it was written take their defaults)."""
        if stored["format_version"] != str(FORMAT_VERSION):
            raise MBCError(
                f"{path} has bank format {stored['format_version']}; this version reads format {FORMAT_VERSION}"
            )
        try:
            theirs = json.loads(stored["layout"])
            return BankLayout(
                **{
                    f.name: theirs[f.name] if f.default is MISSING else theirs.get(f.name, f.default)
                    for f in fields(BankLayout)
                }
            )
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as error:
            raise MBCError(f"{path} is damaged: its stored layout is not readable ({error}); restore it from a copy")

    @classmethod
    def _check_layout(cls, path: Path, stored: dict, layout: BankLayout) -> None:
        theirs = cls._stored_layout(path, stored)
        if theirs.fingerprint != layout.fingerprint:
            raise MBCError(
                f"{path} was written by a model whose {_MEANING.get(theirs.mode, 'model')} "
                f"has fingerprint {str(theirs.fingerprint)[:16]}, but this model's is {str(layout.fingerprint)[:16]}: "
                "its entries would be read as other vectors. Open it with the checkpoint that wrote it, or start a new bank file."
            )
        stored_fields, mine = theirs.__dict__, layout.__dict__
        differing = {k: (stored_fields[k], mine[k]) for k in mine if stored_fields[k] != mine[k]}
        if differing:
            raise MBCError(f"{path} was written with another bank layout (stored, this model): {differing}")

    @property
    @_guarded
    def version(self) -> tuple[int, int]:
        """Changes whenever the stored documents change, by this object or any other connection."""
        return self._changes, self.connection.execute("PRAGMA data_version").fetchone()[0]

    # ---- writing ---------------------------------------------------------------------------
    def known(self, texts: list[str]) -> dict[str, int]:
        """content hash -> id, for those of ``texts`` already stored."""
        return self.ids_of_hashes([content_hash(t) for t in texts])

    @_guarded
    def ids_of_hashes(self, hashes: list[str]) -> dict[str, int]:
        """content hash -> id, for those of ``hashes`` already stored."""
        found = {}
        for start in range(0, len(hashes), 500):
            chunk = hashes[start : start + 500]
            rows = self.connection.execute(
                f"SELECT content_hash, id FROM documents WHERE content_hash IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update(rows.fetchall())
        return found

    @_guarded
    def add(
        self, texts: list[str], entries: np.ndarray, metadata: list[dict] | None = None, keys: np.ndarray | None = None
    ) -> list[Added]:
        """Store each text's entry (as ``model.compress`` returns them) and retrieval key (as
        ``model.retrieval_keys_of`` returns them; only for a model with retrieval keys), all in one
        transaction. A text whose content is already stored (here or earlier in ``texts``) is not
        stored again."""
        metadata = metadata if metadata is not None else [{} for _ in texts]
        key_list = list(keys) if keys is not None else [None] * len(texts)
        if not (len(texts) == len(entries) == len(metadata) == len(key_list)):
            raise MBCError(
                f"add() got {len(texts)} texts, {len(entries)} entries, {len(key_list)} keys "
                f"and {len(metadata)} metadata records"
            )
        check_texts(texts, "add()'s documents")
        blobs = [self.layout.encode(np.asarray(entry)) for entry in entries]  # every check before the first write
        key_blobs = [self.layout.encode_key(key) for key in key_list]
        notes = [metadata_json(m) for m in metadata]
        results, deltas = [], {}
        with self._transaction():  # all of these rows, or (after a crash) none
            for text, entry, blob, key_blob, note in zip(texts, entries, blobs, key_blobs, notes):
                digest = content_hash(text)
                row = self.connection.execute("SELECT id FROM documents WHERE content_hash = ?", (digest,)).fetchone()
                if row:
                    results.append(Added(row[0], False))
                    continue
                cursor = self.connection.execute(
                    "INSERT INTO documents (content_hash, entry, metadata, retrieval_key, checksum) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (digest, blob, note, key_blob, checksum(blob, key_blob)),
                )
                results.append(Added(cursor.lastrowid, True))
                self._count(deltas, np.asarray(entry), +1)
            self._change_counts(deltas)
        self._changes += any(r.new for r in results)
        return results

    @_guarded
    def remove(self, document_id: int) -> None:
        """Delete one document (and its codes from the counts)."""
        deltas = {}
        self._known_id(document_id)
        with self._transaction():
            row = self.connection.execute(
                "SELECT entry, retrieval_key, checksum FROM documents WHERE id = ?", (document_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no document with id {document_id} in {self.path}")
            self.connection.execute("DELETE FROM documents WHERE id = ?", (document_id,))
            if checksum(row[0], row[1]) == row[2]:
                self._count(deltas, self.layout.decode(row[0]), -1)
            else:  # its damaged bytes cannot say which codes to take away: count the rest again
                self.connection.execute("DELETE FROM code_counts")
                for entry in self._rows("entry", None):
                    self._count(deltas, self.layout.decode(entry), +1)
            self._change_counts(deltas)
        self._changes += 1

    def _count(self, deltas: dict[int, int], entry: np.ndarray, sign: int) -> None:
        if self.layout.mode != "mbc":  # only reading an MBC bank counts its codes
            return
        for key in self.layout.format.vector_keys(entry).tolist():
            deltas[key] = deltas.get(key, 0) + sign

    def _change_counts(self, deltas: dict[int, int]) -> None:
        # By how much, not to what: another writer's counts since this object last looked stay.
        self.connection.executemany(
            "INSERT INTO code_counts VALUES (?, ?) "
            "ON CONFLICT (vector_key) DO UPDATE SET count = count + excluded.count",
            [(k, v) for k, v in deltas.items() if v],
        )
        self.connection.execute("DELETE FROM code_counts WHERE count <= 0")

    def _metadata_of(self, document_id: int, note) -> dict:
        try:
            record = json.loads(note)
        except (TypeError, ValueError, RecursionError):
            record = None
        if not isinstance(record, dict):
            raise MBCError(
                f"{self.path} is damaged: the metadata of document {document_id} is not a JSON object; "
                "delete the document (mbc bank --delete) or restore the file from a copy"
            )
        return record

    def _known_id(self, document_id: int) -> int:
        if not isinstance(document_id, int) or not 0 <= document_id <= MAX_ID:
            raise NotFound(f"no document with id {document_id} in {self.path}")
        return document_id

    # ---- reading ---------------------------------------------------------------------------
    @_guarded
    def __len__(self) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    @_guarded
    def ids(self) -> list[int]:
        return [row[0] for row in self.connection.execute("SELECT id FROM documents ORDER BY id")]

    def entries(self, ids: list[int] | None = None) -> np.ndarray:
        """Stored entries [N, K, stages or dim], in id order (or in the order of ``ids``)."""
        blobs = self._rows("entry", ids)
        if not blobs:
            return np.zeros((0, *self.layout.entry_shape), dtype=np.float32)
        return np.stack([self.layout.decode(blob) for blob in blobs])

    def retrieval_keys(self, ids: list[int] | None = None) -> np.ndarray:
        """Stored retrieval keys [N, pieces], in id order (or in the order of ``ids``)."""
        if not self.layout.key_pieces:
            raise MBCError(f"{self.path} stores no retrieval keys: its model has retrieval_top_k = 0")
        blobs = self._rows("retrieval_key", ids)
        return (
            np.stack([self.layout.decode_key(b) for b in blobs])
            if blobs
            else np.zeros((0, self.layout.key_pieces), np.int64)
        )

    @_guarded
    def _rows(self, column: str, ids: list[int] | None) -> list[bytes]:
        """``column`` of the given documents (all, in id order, for None), each checked against its checksum."""
        select = f"SELECT id, {column}, entry, retrieval_key, checksum FROM documents"
        if ids is None:
            rows = self.connection.execute(select + " ORDER BY id").fetchall()
        else:
            found = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                query = f"{select} WHERE id IN ({','.join('?' * len(chunk))})"
                found.update((row[0], row) for row in self.connection.execute(query, chunk))
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFound(f"no documents with ids {missing[:5]} in {self.path}")
            rows = [found[i] for i in ids]
        damaged = [row[0] for row in rows if checksum(row[2], row[3]) != row[4]]
        if damaged:
            raise MBCError(
                f"{self.path} is damaged: the stored bytes of documents {damaged[:5]} fail their checksum; "
                "remove them (bank.remove) or restore the file from a copy"
            )
        return [row[1] for row in rows]

    @_guarded
    def listing(self, offset: int = 0, limit: int = 100) -> list[dict]:
        """Stored documents in id order from ``offset``: id, metadata and stored bytes of each."""
        if offset < 0 or limit < 0:
            raise MBCError(f"offset and limit must not be negative, got {offset} and {limit}")
        offset, limit = min(offset, MAX_ID), min(limit, MAX_ID)  # beyond SQLite's integers there are no rows anyway
        rows = self.connection.execute(
            "SELECT id, metadata, LENGTH(entry) + COALESCE(LENGTH(retrieval_key), 0) FROM documents "
            "ORDER BY id LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        return [{"id": i, "metadata": self._metadata_of(i, note), "bytes": size} for i, note, size in rows]

    @_guarded
    def metadata(self, document_id: int) -> dict:
        self._known_id(document_id)
        row = self.connection.execute("SELECT metadata FROM documents WHERE id = ?", (document_id,)).fetchone()
        if row is None:
            raise NotFound(f"no document with id {document_id} in {self.path}")
        return self._metadata_of(document_id, row[0])

    @_guarded
    def code_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """MBC: the distinct stored vectors as code tuples [n, stages] and how often each occurs [n]."""
        if self.layout.mode != "mbc":
            raise MBCError("code counts exist only for an MBC (codebook) bank; a MAC bank stores float vectors")
        rows = self.connection.execute("SELECT vector_key, count FROM code_counts ORDER BY vector_key").fetchall()
        keys = np.array([k for k, _ in rows], dtype=np.int64)
        return self.layout.format.codes_of_keys(keys), np.array([c for _, c in rows], dtype=np.int64)

    @_guarded
    def sizes(self) -> dict[str, int]:
        """Bytes: the entries and retrieval keys as stored, the codebook (MBC, stored once with the model), and what
        MAC's float32 bank would take for the same documents."""
        documents, stored, keys = self.connection.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(entry)), 0), COALESCE(SUM(LENGTH(retrieval_key)), 0) FROM documents"
        ).fetchone()
        layout = self.layout
        codebook = layout.stages * layout.codebook_size * layout.dim * 4 if layout.mode == "mbc" else 0
        return {
            "documents": documents,
            "stored_bytes": stored + keys,
            "entry_bytes": stored,
            "key_bytes": keys,
            "codebook_bytes": codebook,
            "mac_equivalent_bytes": documents * layout.num_slots * layout.dim * 4,
            "file_bytes": sum(p.stat().st_size for p in self._files()),
        }

    def _files(self) -> list[Path]:
        if str(self.path) == ":memory:":
            return []
        return [p for p in (self.path, Path(f"{self.path}-wal")) if p.exists()]

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "MemoryBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

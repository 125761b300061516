"""The memory bank: what a stored document is, and the guarantees every bank keeps, on any storage.

Each stored document is one row: an id, the SHA-256 of its text (so re-adding the same content is
detected), its entry (MBC: the K code indices, bit-packed; MAC: K float32 vectors), its retrieval
key when the model has one (a few bit-packed product-quantizer indices, network/retrieval.py) and JSON
metadata. Beside the rows the bank keeps:

- ``meta``: the bank's layout (mode, K, stages, codebook size, width) and the fingerprint of the
  model that wrote it. Stored indices mean nothing under another codebook, so a bank refuses to be
  opened with a model whose fingerprint differs.
- ``code_counts`` (MBC): how often each stored vector (a code, or a tuple of codes with residual
  stages) occurs in the bank, kept in the same transaction as the rows. Answering reads these
  counts, not the rows: its cost depends on the codebook, not on the number of documents.

Durability: every ``add`` and ``remove`` is one transaction in which writers take turns, and
changes the counts by what it adds or removes, so several processes may write to one bank. A
process killed mid-ingest leaves every document whose ``add`` returned, and no part of any other.
Each row carries a CRC-32 of its stored bytes, checked whenever they are read, so damaged storage
is reported rather than read as other codes. A bank object notices what other processes wrote
(``version``).

Where the rows live is a ``Storage``: a file path is an SQLite file (sqlite.py, the default), a
``postgresql://`` URL a schema on a PostgreSQL server (postgres.py), shared by processes on many
machines. A storage runs this file's SQL (written with ``?`` placeholders, in the subset both
speak) and says what its errors mean; everything else is here, once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np

from mbc.bank.layout import BankLayout
from mbc.errors import MBCError, NotFound, check_texts

# 2: documents gained the retrieval_key column; 3: and a checksum. Older files are upgraded on opening.
FORMAT_VERSION = 3
BANK_TABLES = {"meta", "documents", "code_counts"}


_MEANING = {
    "mbc": "codebook",
    "mac": "amortization network",
    "tokens": "token scorer",
    "coded_tokens": "token scorer and code",
}  # fixes what an entry means


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Added:
    id: int
    new: bool  # False: the same content was already in the bank (under this id)


MAX_ID = 2**63 - 1  # the largest id either storage holds: a larger id or offset names no row
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


class Storage(Protocol):
    """Where a bank's rows live: sqlite.py's ``SQLiteStorage`` or postgres.py's ``PostgresStorage``."""

    address: str  # the file, or the URL without its password: every message names it
    errors: tuple[type[Exception], ...]  # what its library raises; ``explain`` makes each one line

    def execute(self, sql: str, parameters=()): ...  # a cursor: fetchone, fetchall, iteration
    def executemany(self, sql: str, rows) -> None: ...
    def transaction(self): ...  # a context in which writers take turns: all of it, or (crash) none
    def tables(self) -> set[str]: ...  # the tables where this bank's would be
    def create_tables(self) -> None: ...  # inside a transaction, where ``tables()`` is empty
    def after_opening(self) -> None: ...  # once the tables are known to be a bank's
    def changed(self) -> None: ...  # inside a write transaction: ``version()`` moves for other readers
    def version(self) -> int: ...  # moves when another connection changes the rows
    def ids_taken(self) -> None: ...  # after rows were inserted with their own ids
    def disk_bytes(self) -> int: ...
    def explain(self, error: Exception) -> MBCError: ...  # one line naming the bank and what to do
    def close(self) -> None: ...


def open_storage(address, create: bool) -> Storage:
    """The storage an address names: a ``postgresql://`` URL, else a file path."""
    from mbc.bank.postgres import PostgresStorage, is_postgres_url
    from mbc.bank.sqlite import SQLiteStorage

    if is_postgres_url(address):
        return PostgresStorage.open(address, create)
    return SQLiteStorage.open(address, create)


def _guarded(method):
    """The storage's errors reach the caller as one MBCError line naming the bank."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except self.storage.errors as error:
            raise self.storage.explain(error) from error

    return wrapper


class MemoryBank:
    """A durable bank of compressed documents. Open with ``MemoryBank.open(address, layout)``."""

    def __init__(self, storage: Storage, layout: BankLayout | None):
        self.storage, self.layout = storage, layout
        self.address = self.opened_from = storage.address
        self._changes = 0  # by this object; the storage's version counts the other connections'

    @classmethod
    def open(cls, address: str | Path, layout: BankLayout | None) -> "MemoryBank":
        """Open the bank at ``address`` (a file path or a ``postgresql://`` URL; created if missing)
        for a model of this layout. Storage that holds something else, or a bank written for another
        model, is refused untouched. ``layout=None``: an existing bank in the layout stored in it
        (listing, sizes and deleting need no model)."""
        storage = open_storage(address, create=layout is not None)
        bank = cls(storage, layout)
        bank.opened_from = str(address)  # ``address`` may hold a password: never shown, only reopened
        try:
            bank._open()
        except BaseException:
            storage.close()
            raise
        return bank

    @_guarded
    def _open(self) -> None:
        stored = self._create_or_read_meta()
        self.storage.after_opening()
        if stored["format_version"] in ("1", "2"):
            stored["format_version"] = self._upgrade(stored["format_version"])
        if self.layout is None:
            self.layout = self._stored_layout(stored)
        else:
            self._check_layout(stored, self.layout)

    @classmethod
    def open_existing(cls, address: str | Path) -> "MemoryBank":
        """An existing bank, in the layout stored in it (``open(address, None)``)."""
        return cls.open(address, None)

    @classmethod
    def in_memory(cls, layout: BankLayout) -> "MemoryBank":
        """A bank that lives only as long as this object (validation reads one, through the same
        readers as a stored bank)."""
        from mbc.bank.sqlite import SQLiteStorage

        bank = cls(SQLiteStorage.in_memory(), layout)
        bank._open()
        return bank

    def _create_or_read_meta(self) -> dict:
        """Empty storage becomes a bank of this layout; storage that holds tables must already be one."""
        storage = self.storage
        with storage.transaction():
            tables = storage.tables()
            if not tables and self.layout is None:
                raise MBCError(
                    f"no memory bank at {self.address}: make one with `mbc ingest '{self.address}' FILES...`"
                )
            if not tables:
                storage.create_tables()
                wanted = {
                    "format_version": str(FORMAT_VERSION),
                    "layout": json.dumps(self.layout.__dict__, sort_keys=True),
                }
                storage.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())
        if not BANK_TABLES <= tables and tables:
            raise MBCError(
                f"{self.address} holds tables but not a memory bank's (its tables: {', '.join(sorted(tables))}); "
                "it was left untouched: give a new file or bank name for a new bank"
            )
        stored = dict(storage.execute("SELECT key, value FROM meta").fetchall())
        if "format_version" not in stored or "layout" not in stored:
            raise MBCError(
                f"{self.address} is damaged: its meta table lacks the bank format or layout; restore it from a copy"
            )
        return stored

    def _upgrade(self, version: str) -> str:
        """Format 1 and 2 banks (SQLite files of earlier versions) gain the columns they lack."""
        storage = self.storage
        with storage.transaction():
            if version == "1":
                storage.execute("ALTER TABLE documents ADD COLUMN retrieval_key BLOB")
            storage.execute("ALTER TABLE documents ADD COLUMN checksum INTEGER NOT NULL DEFAULT 0")
            rows = storage.execute("SELECT id, entry, retrieval_key FROM documents").fetchall()
            storage.executemany(
                "UPDATE documents SET checksum = ? WHERE id = ?", [(checksum(e, k), i) for i, e, k in rows]
            )
            storage.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION),))
        return str(FORMAT_VERSION)

    def _stored_layout(self, stored: dict) -> BankLayout:
        """The layout a bank records (fields added since it was written take their defaults)."""
        if stored["format_version"] != str(FORMAT_VERSION):
            raise MBCError(
                f"{self.address} has bank format {stored['format_version']}; this version reads format {FORMAT_VERSION}"
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
            raise MBCError(
                f"{self.address} is damaged: its stored layout is not readable ({error}); restore it from a copy"
            )

    def _check_layout(self, stored: dict, layout: BankLayout) -> None:
        theirs = self._stored_layout(stored)
        if theirs.fingerprint != layout.fingerprint:
            raise MBCError(
                f"{self.address} was written by a model whose {_MEANING.get(theirs.mode, 'model')} "
                f"has fingerprint {str(theirs.fingerprint)[:16]}, but this model's is {str(layout.fingerprint)[:16]}: "
                "its entries would be read as other vectors. Open it with the checkpoint that wrote it, or start a new bank."
            )
        stored_fields, mine = theirs.__dict__, layout.__dict__
        differing = {k: (stored_fields[k], mine[k]) for k in mine if stored_fields[k] != mine[k]}
        if differing:
            raise MBCError(f"{self.address} was written with another bank layout (stored, this model): {differing}")

    @property
    @_guarded
    def version(self) -> tuple[int, int]:
        """Changes whenever the stored documents change, by this object or any other connection."""
        return self._changes, self.storage.version()

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
            rows = self.storage.execute(
                f"SELECT content_hash, id FROM documents WHERE content_hash IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update(rows.fetchall())
        return found

    @_guarded
    def add(
        self, texts: list[str], entries: np.ndarray, metadata: list[dict] | None = None, keys: np.ndarray | None = None
    ) -> list[Added]:
        """Store each text's entry (as ``model.compress`` returns them) and retrieval key (as
        ``RetrievalKeys.keys_of`` returns them; only for a model with retrieval keys), all in one
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
        with self.storage.transaction():  # all of these rows, or (after a crash) none
            for text, entry, blob, key_blob, note in zip(texts, entries, blobs, key_blobs, notes):
                digest = content_hash(text)
                row = self.storage.execute("SELECT id FROM documents WHERE content_hash = ?", (digest,)).fetchone()
                if row:
                    results.append(Added(row[0], False))
                    continue
                new_id = self.storage.execute(
                    "INSERT INTO documents (content_hash, entry, metadata, retrieval_key, checksum) "
                    "VALUES (?, ?, ?, ?, ?) RETURNING id",
                    (digest, blob, note, key_blob, checksum(blob, key_blob)),
                ).fetchone()[0]
                results.append(Added(new_id, True))
                self._count(deltas, np.asarray(entry), +1)
            self._change_counts(deltas)
            if any(r.new for r in results):
                self.storage.changed()
        self._changes += any(r.new for r in results)
        return results

    @_guarded
    def remove(self, document_id: int) -> None:
        """Delete one document (and its codes from the counts)."""
        deltas = {}
        self._known_id(document_id)
        with self.storage.transaction():
            row = self.storage.execute(
                "SELECT entry, retrieval_key, checksum FROM documents WHERE id = ?", (document_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no document with id {document_id} in {self.address}")
            self.storage.execute("DELETE FROM documents WHERE id = ?", (document_id,))
            if checksum(row[0], row[1]) == row[2]:
                self._count(deltas, self.layout.decode(row[0]), -1)
            else:  # its damaged bytes cannot say which codes to take away: count the rest again
                self.storage.execute("DELETE FROM code_counts")
                for entry in self._rows("entry", None):
                    self._count(deltas, self.layout.decode(entry), +1)
            self._change_counts(deltas)
            self.storage.changed()
        self._changes += 1

    def _count(self, deltas: dict[int, int], entry: np.ndarray, sign: int) -> None:
        if self.layout.mode != "mbc":  # only reading an MBC bank counts its codes
            return
        for key in self.layout.format.vector_keys(entry).tolist():
            deltas[key] = deltas.get(key, 0) + sign

    def _change_counts(self, deltas: dict[int, int]) -> None:
        # By how much, not to what: another writer's counts since this object last looked stay.
        self.storage.executemany(
            "INSERT INTO code_counts VALUES (?, ?) "
            "ON CONFLICT (vector_key) DO UPDATE SET count = code_counts.count + excluded.count",
            [(k, v) for k, v in deltas.items() if v],
        )
        self.storage.execute("DELETE FROM code_counts WHERE count <= 0")

    def _metadata_of(self, document_id: int, note) -> dict:
        try:
            record = json.loads(note)
        except (TypeError, ValueError, RecursionError):
            record = None
        if not isinstance(record, dict):
            raise MBCError(
                f"{self.address} is damaged: the metadata of document {document_id} is not a JSON object; "
                "delete the document (mbc bank --delete) or restore the file from a copy"
            )
        return record

    def _known_id(self, document_id: int) -> int:
        if not isinstance(document_id, int) or not 0 <= document_id <= MAX_ID:
            raise NotFound(f"no document with id {document_id} in {self.address}")
        return document_id

    # ---- reading ---------------------------------------------------------------------------
    @_guarded
    def __len__(self) -> int:
        return self.storage.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    @_guarded
    def ids(self) -> list[int]:
        return [row[0] for row in self.storage.execute("SELECT id FROM documents ORDER BY id")]

    def entries(self, ids: list[int] | None = None) -> np.ndarray:
        """Stored entries [N, K, stages or dim], in id order (or in the order of ``ids``)."""
        blobs = self._rows("entry", ids)
        if not blobs:
            return np.zeros((0, *self.layout.entry_shape), dtype=np.float32)
        return np.stack([self.layout.decode(blob) for blob in blobs])

    def retrieval_keys(self, ids: list[int] | None = None) -> np.ndarray:
        """Stored retrieval keys [N, pieces], in id order (or in the order of ``ids``)."""
        if not self.layout.key_pieces:
            raise MBCError(f"{self.address} stores no retrieval keys: its model has retrieval_top_k = 0")
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
            rows = self.storage.execute(select + " ORDER BY id").fetchall()
        else:
            found = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                query = f"{select} WHERE id IN ({','.join('?' * len(chunk))})"
                found.update((row[0], row) for row in self.storage.execute(query, chunk))
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFound(f"no documents with ids {missing[:5]} in {self.address}")
            rows = [found[i] for i in ids]
        damaged = [row[0] for row in rows if checksum(row[2], row[3]) != row[4]]
        if damaged:
            raise MBCError(
                f"{self.address} is damaged: the stored bytes of documents {damaged[:5]} fail their checksum; "
                "remove them (bank.remove) or restore the file from a copy"
            )
        return [row[1] for row in rows]

    @_guarded
    def listing(self, offset: int = 0, limit: int = 100) -> list[dict]:
        """Stored documents in id order from ``offset``: id, metadata and stored bytes of each."""
        if offset < 0 or limit < 0:
            raise MBCError(f"offset and limit must not be negative, got {offset} and {limit}")
        offset, limit = min(offset, MAX_ID), min(limit, MAX_ID)  # beyond SQLite's integers there are no rows anyway
        rows = self.storage.execute(
            "SELECT id, metadata, LENGTH(entry) + COALESCE(LENGTH(retrieval_key), 0) FROM documents "
            "ORDER BY id LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        return [{"id": i, "metadata": self._metadata_of(i, note), "bytes": size} for i, note, size in rows]

    @_guarded
    def metadata(self, document_id: int) -> dict:
        self._known_id(document_id)
        row = self.storage.execute("SELECT metadata FROM documents WHERE id = ?", (document_id,)).fetchone()
        if row is None:
            raise NotFound(f"no document with id {document_id} in {self.address}")
        return self._metadata_of(document_id, row[0])

    @_guarded
    def code_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """MBC: the distinct stored vectors as code tuples [n, stages] and how often each occurs [n]."""
        if self.layout.mode != "mbc":
            raise MBCError("code counts exist only for an MBC (codebook) bank; a MAC bank stores float vectors")
        rows = self.storage.execute("SELECT vector_key, count FROM code_counts ORDER BY vector_key").fetchall()
        keys = np.array([k for k, _ in rows], dtype=np.int64)
        return self.layout.format.codes_of_keys(keys), np.array([c for _, c in rows], dtype=np.int64)

    @_guarded
    def sizes(self) -> dict[str, int]:
        """Bytes: the entries and retrieval keys as stored, the codebook (MBC, stored once with the model), and what
        MAC's float32 bank would take for the same documents."""
        documents, stored, keys = self.storage.execute(
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
            "file_bytes": self.storage.disk_bytes(),
        }

    # ---- copying between storages --------------------------------------------------------------
    def _documents(self, page: int = 1000):
        """Every stored row, (id, content_hash, entry, metadata, retrieval_key, checksum), in id order."""
        last = -1
        while True:
            rows = self.storage.execute(
                "SELECT id, content_hash, entry, metadata, retrieval_key, checksum FROM documents "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (last, page),
            ).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    @_guarded
    def digest(self) -> str:
        """SHA-256 over every row (id, content hash, checksum, metadata) and the code counts: two
        banks with the same digest hold the same documents under the same ids."""
        hasher = hashlib.sha256(json.dumps(self.layout.__dict__, sort_keys=True).encode())
        for document_id, content, _, note, _, crc in self._documents():
            hasher.update(f"{document_id} {content} {crc} {note}\n".encode())
        if self.layout.mode == "mbc":
            for row in self.storage.execute("SELECT vector_key, count FROM code_counts ORDER BY vector_key"):
                hasher.update(f"{row[0]} {row[1]}\n".encode())
        return hasher.hexdigest()

    def copy_to(self, address: str | Path, progress=None) -> "MemoryBank":
        """This bank's documents, under the same ids, into a new bank at ``address`` (another file,
        or a PostgreSQL URL), in one transaction: all of it or nothing. Writers of this bank wait
        until it is done. ``progress`` (a tqdm bar, or None) advances by each document. Refuses a
        destination that holds documents, and checks that both banks' digests agree."""
        if str(address) == self.address:
            raise MBCError(f"cannot copy {self.address} onto itself: name another bank")
        destination = MemoryBank.open(address, self.layout)
        try:
            destination._copy_from(self, progress)
            if destination.digest() != self.digest():
                raise MBCError(f"the copy at {destination.address} differs from {self.address}")
        except self.storage.errors as error:  # the source's storage failed while the copy read it
            destination.close()
            raise self.storage.explain(error) from error
        except BaseException:
            destination.close()
            raise
        return destination

    @_guarded
    def _copy_from(self, source: "MemoryBank", progress) -> None:
        if len(self):
            raise MBCError(f"{self.address} already holds {len(self)} documents: copy into a new bank")
        deltas = {}
        with source.storage.transaction(), self.storage.transaction():
            for row in source._documents():
                if checksum(row[2], row[4]) != row[5]:
                    raise MBCError(
                        f"{source.address} is damaged: document {row[0]} fails its checksum; "
                        "remove it (mbc bank --delete) before copying"
                    )
                self.storage.execute(
                    "INSERT INTO documents (id, content_hash, entry, metadata, retrieval_key, checksum) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )
                self._count(deltas, self.layout.decode(row[2]), +1)
                if progress is not None:
                    progress.update(1)
            self._change_counts(deltas)
            self.storage.ids_taken()
            self.storage.changed()
        self._changes += 1

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> "MemoryBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

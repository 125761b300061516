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

Durability: every ``add`` is one SQLite transaction (WAL journal, synchronous=FULL). A process
killed mid-ingest leaves every document whose ``add`` returned, and no part of any other.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from mbc.errors import MBCError
from mbc.memory.codecs import CodeFormat, FloatFormat
from mbc.memory.packing import pack_indices, unpack_indices

FORMAT_VERSION = 2  # 2: documents gained the retrieval_key column (a format-1 file is upgraded on opening)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class BankLayout:
    """What a stored entry is: MBC indices [K, stages] from ``codebook_size`` codes, or MAC vectors [K, dim]."""

    mode: str  # "mbc" or "mac"
    num_slots: int
    stages: int
    codebook_size: int
    dim: int
    fingerprint: str | None  # of the model that gives the entries their meaning
    key_pieces: int = 0  # retrieval key: indices per document (0: the model has no retrieval keys)
    key_codes: int = 0  # ... each among this many centroids

    @classmethod
    def of(cls, model) -> "BankLayout":
        config = model.config
        keys = (config.retrieval_subspaces, config.retrieval_codes) if config.retrieval_top_k else (0, 0)
        return cls(
            model.codec.mode,
            config.num_slots,
            config.codebook_stages,
            config.codebook_size,
            model.layout.hidden_size,
            model.bank_fingerprint(),
            *keys,
        )

    @property
    def format(self) -> CodeFormat | FloatFormat:
        """How an entry is laid out in bytes (memory/codecs.py)."""
        if self.mode == "mbc":
            return CodeFormat(self.num_slots, self.stages, self.codebook_size)
        return FloatFormat(self.num_slots, self.dim)

    @property
    def entry_shape(self) -> tuple[int, int]:
        return self.format.shape

    @property
    def entry_bytes(self) -> int:
        return self.format.bytes

    def encode(self, entry: np.ndarray) -> bytes:
        if entry.shape != self.entry_shape:
            raise MBCError(f"a bank entry must have shape {self.entry_shape}, got {tuple(entry.shape)}")
        return self.format.to_bytes(entry)

    def decode(self, blob: bytes) -> np.ndarray:
        return self.format.from_bytes(blob)

    def encode_key(self, key: np.ndarray | None) -> bytes | None:
        if not self.key_pieces:
            if key is not None:
                raise MBCError(
                    "this bank stores no retrieval keys (its model has retrieval_top_k = 0), but keys were given"
                )
            return None
        if key is None:
            raise MBCError("this bank's model reads by retrieval keys (retrieval_top_k > 0): add() needs keys= as well")
        key = np.asarray(key)
        if key.shape != (self.key_pieces,):
            raise MBCError(f"a retrieval key must have shape ({self.key_pieces},), got {tuple(key.shape)}")
        return pack_indices(key, self.key_codes)

    def decode_key(self, blob: bytes) -> np.ndarray:
        return unpack_indices(blob, self.key_pieces, self.key_codes)


@dataclass
class Added:
    id: int
    new: bool  # False: the same content was already in the bank (under this id)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash TEXT NOT NULL UNIQUE,
    entry BLOB NOT NULL,
    metadata TEXT NOT NULL,
    retrieval_key BLOB
);
CREATE TABLE IF NOT EXISTS code_counts (vector_key INTEGER PRIMARY KEY, count INTEGER NOT NULL);
"""


class MemoryBank:
    """A durable bank of compressed documents. Open with ``MemoryBank.open(path, layout)``."""

    def __init__(self, connection: sqlite3.Connection, layout: BankLayout, path: Path):
        self.connection, self.layout, self.path = connection, layout, path
        self.version = 0  # bumped by every change made through this object: readers rebuild on it
        self._counts = dict(connection.execute("SELECT vector_key, count FROM code_counts").fetchall())

    @classmethod
    def open(cls, path: str | Path, layout: BankLayout) -> "MemoryBank":
        """Open the bank at ``path`` (created if missing) for a model of this layout."""
        path = Path(path)
        if path.exists() and path.is_dir():
            raise MBCError(f"{path} is a folder; a memory bank is a single SQLite file")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = sqlite3.connect(path)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            with connection:
                connection.executescript(_SCHEMA)
            stored = dict(connection.execute("SELECT key, value FROM meta").fetchall())
            if stored.get("format_version") == "1":
                stored["format_version"] = cls._upgrade_from_format_1(connection)
        except sqlite3.DatabaseError as error:
            raise MBCError(f"{path} is not a readable memory bank ({error})") from error
        if not stored:
            cls._write_layout(connection, layout)
        else:
            cls._check_layout(path, stored, layout)
        return cls(connection, layout, path)

    @classmethod
    def in_memory(cls, layout: BankLayout) -> "MemoryBank":
        """A bank that lives only as long as this object (validation reads one, through the same
        readers as a bank on disk)."""
        connection = sqlite3.connect(":memory:")
        with connection:
            connection.executescript(_SCHEMA)
        cls._write_layout(connection, layout)
        return cls(connection, layout, Path(":memory:"))

    @staticmethod
    def _write_layout(connection: sqlite3.Connection, layout: BankLayout) -> None:
        wanted = {"format_version": str(FORMAT_VERSION), "layout": json.dumps(layout.__dict__, sort_keys=True)}
        with connection:
            connection.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())

    @staticmethod
    def _upgrade_from_format_1(connection: sqlite3.Connection) -> str:
        with connection:
            connection.execute("ALTER TABLE documents ADD COLUMN retrieval_key BLOB")
            connection.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION),))
        return str(FORMAT_VERSION)

    @staticmethod
    def _check_layout(path: Path, stored: dict, layout: BankLayout) -> None:
        if stored.get("format_version") != str(FORMAT_VERSION):
            raise MBCError(
                f"{path} has bank format {stored.get('format_version')}; this version reads format {FORMAT_VERSION}"
            )
        theirs = json.loads(stored["layout"])
        if theirs["fingerprint"] != layout.fingerprint:
            raise MBCError(
                f"{path} was written by a model whose {'codebook' if theirs['mode'] == 'mbc' else 'amortization network'} "
                f"has fingerprint {str(theirs['fingerprint'])[:16]}, but this model's is {str(layout.fingerprint)[:16]}: "
                "its entries would be read as other vectors. Open it with the checkpoint that wrote it, or start a new bank file."
            )
        mine = layout.__dict__
        defaults = {f.name: f.default for f in fields(BankLayout)}  # fields added since the file was written
        differing = {k: (theirs.get(k, defaults[k]), mine[k]) for k in mine if theirs.get(k, defaults[k]) != mine[k]}
        if differing:
            raise MBCError(f"{path} was written with another bank layout (stored, this model): {differing}")

    # ---- writing ---------------------------------------------------------------------------
    def known(self, texts: list[str]) -> dict[str, int]:
        """content hash -> id, for those of ``texts`` already stored."""
        return self.ids_of_hashes([content_hash(t) for t in texts])

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
        blobs = [self.layout.encode(np.asarray(entry)) for entry in entries]  # every check before the first write
        key_blobs = [self.layout.encode_key(key) for key in key_list]
        notes = [self._metadata_json(m) for m in metadata]
        results, counts = [], dict(self._counts)
        with self.connection:  # one transaction: all of these rows, or (after a crash) none
            for text, entry, blob, key_blob, note in zip(texts, entries, blobs, key_blobs, notes):
                digest = content_hash(text)
                row = self.connection.execute("SELECT id FROM documents WHERE content_hash = ?", (digest,)).fetchone()
                if row:
                    results.append(Added(row[0], False))
                    continue
                cursor = self.connection.execute(
                    "INSERT INTO documents (content_hash, entry, metadata, retrieval_key) VALUES (?, ?, ?, ?)",
                    (digest, blob, note, key_blob),
                )
                results.append(Added(cursor.lastrowid, True))
                self._count(counts, np.asarray(entry), +1)
            self._write_counts(counts)
        self._counts = counts  # only once the transaction has committed
        self.version += any(r.new for r in results)
        return results

    def remove(self, document_id: int) -> None:
        """Delete one document (and its codes from the counts)."""
        row = self.connection.execute("SELECT entry FROM documents WHERE id = ?", (document_id,)).fetchone()
        if row is None:
            raise MBCError(f"no document with id {document_id} in {self.path}")
        counts = dict(self._counts)
        with self.connection:
            self.connection.execute("DELETE FROM documents WHERE id = ?", (document_id,))
            self._count(counts, self.layout.decode(row[0]), -1)
            self._write_counts(counts)
        self._counts = counts
        self.version += 1

    def _count(self, counts: dict[int, int], entry: np.ndarray, sign: int) -> None:
        if self.layout.format.vector_keys is None:  # a float (MAC) bank keeps no counts
            return
        for key in self.layout.format.vector_keys(entry).tolist():
            counts[key] = counts.get(key, 0) + sign

    def _write_counts(self, counts: dict[int, int]) -> None:
        changed = [(k, v) for k, v in counts.items() if self._counts.get(k) != v]
        self.connection.executemany(
            "INSERT OR REPLACE INTO code_counts VALUES (?, ?)", [(k, v) for k, v in changed if v > 0]
        )
        self.connection.executemany(
            "DELETE FROM code_counts WHERE vector_key = ?", [(k,) for k, v in changed if v <= 0]
        )
        for key in [k for k, v in counts.items() if v <= 0]:
            del counts[key]

    @staticmethod
    def _metadata_json(record: dict) -> str:
        try:
            return json.dumps(record, sort_keys=True)
        except TypeError as error:
            raise MBCError(f"document metadata must be JSON (strings, numbers, lists, dicts): {error}") from error

    # ---- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    def ids(self) -> list[int]:
        return [row[0] for row in self.connection.execute("SELECT id FROM documents ORDER BY id")]

    def entries(self, ids: list[int] | None = None) -> np.ndarray:
        """Stored entries [N, K, stages or dim], in id order (or in the order of ``ids``)."""
        blobs = self._column("entry", ids)
        if not blobs:
            return np.zeros((0, *self.layout.entry_shape), dtype=np.float32)
        return np.stack([self.layout.decode(blob) for blob in blobs])

    def retrieval_keys(self, ids: list[int] | None = None) -> np.ndarray:
        """Stored retrieval keys [N, pieces], in id order (or in the order of ``ids``)."""
        if not self.layout.key_pieces:
            raise MBCError(f"{self.path} stores no retrieval keys: its model has retrieval_top_k = 0")
        blobs = self._column("retrieval_key", ids)
        return (
            np.stack([self.layout.decode_key(b) for b in blobs])
            if blobs
            else np.zeros((0, self.layout.key_pieces), np.int64)
        )

    def _column(self, column: str, ids: list[int] | None) -> list[bytes]:
        if ids is None:
            return [row[0] for row in self.connection.execute(f"SELECT {column} FROM documents ORDER BY id")]
        found = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found.update(
                self.connection.execute(
                    f"SELECT id, {column} FROM documents WHERE id IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
            )
        missing = [i for i in ids if i not in found]
        if missing:
            raise MBCError(f"no documents with ids {missing[:5]} in {self.path}")
        return [found[i] for i in ids]

    def metadata(self, document_id: int) -> dict:
        row = self.connection.execute("SELECT metadata FROM documents WHERE id = ?", (document_id,)).fetchone()
        if row is None:
            raise MBCError(f"no document with id {document_id} in {self.path}")
        return json.loads(row[0])

    def code_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """MBC: the distinct stored vectors as code tuples [n, stages] and how often each occurs [n]."""
        if self.layout.mode != "mbc":
            raise MBCError("code counts exist only for an MBC (codebook) bank; a MAC bank stores float vectors")
        keys = np.array(sorted(self._counts), dtype=np.int64)
        return self.layout.format.codes_of_keys(keys), np.array(
            [self._counts[k] for k in keys.tolist()], dtype=np.int64
        )

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

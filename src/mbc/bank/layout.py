"""What a bank's entries are: the layout every bank file records, and its model must match."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mbc.bank.formats import CodeFormat, FloatFormat
from mbc.bank.packing import pack_indices, unpack_indices
from mbc.errors import MBCError


@dataclass(frozen=True)
class BankLayout:
    """What a stored entry is: MBC indices [K, stages] from ``codebook_size`` codes, or MAC vectors [K, dim]."""

    # "mbc", "mac", "tokens" (token_memory.py: LLM token ids), "coded_tokens" (their prefix code's bytes)
    # or "coded_mbc" (MBC's vocabulary codes under a prefix code: network/codecs.py)
    mode: str
    num_slots: int
    stages: int
    codebook_size: int
    dim: int
    fingerprint: str | None  # of the model that gives the entries their meaning
    key_pieces: int = 0  # retrieval key: indices per document (0: the model has no retrieval keys)
    key_codes: int = 0  # ... each among this many centroids

    @classmethod
    def of(cls, model) -> "BankLayout":
        """The layout of the entries ``model`` writes (``MBCModel`` or ``TokenMemory``: each says its own)."""
        return model.bank_layout()

    @property
    def format(self) -> CodeFormat | FloatFormat:
        """How an entry is laid out in bytes (formats.py)."""
        # tokens: LLM token ids, bit-packed as code indices are; coded: bytes, 8-bit "codes"
        if self.mode in ("mbc", "tokens", "coded_tokens", "coded_mbc"):
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

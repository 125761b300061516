"""A bank entry as bytes, for MBC (code indices, bit-packed) and MAC (float32 vectors): no model,
no torch. What the bytes mean (codes -> vectors) is the model's codec (network/codecs.py)."""

from __future__ import annotations

import numpy as np

from mbc.bank.packing import index_dtype, pack_indices, packed_size, unpack_indices
from mbc.errors import MBCError


class CodeFormat:
    """MBC entries on disk: K x stages indices among ``codebook_size`` codes, bit-packed."""

    def __init__(self, num_slots: int, stages: int, codebook_size: int):
        self.num_slots, self.stages, self.codebook_size = num_slots, stages, codebook_size
        self.shape = (num_slots, stages)
        self.bytes = packed_size(num_slots * stages, codebook_size)

    def to_bytes(self, entry: np.ndarray) -> bytes:
        return pack_indices(entry, self.codebook_size)

    def from_bytes(self, blob: bytes) -> np.ndarray:
        return unpack_indices(blob, self.num_slots * self.stages, self.codebook_size).reshape(self.shape)

    def vector_keys(self, entry: np.ndarray) -> np.ndarray:
        """One integer per stored vector (its code tuple, in base ``codebook_size``): what the bank's code counts count."""
        keys = np.zeros(entry.shape[0], dtype=np.int64)
        for stage in reversed(range(self.stages)):
            keys = keys * self.codebook_size + entry[:, stage].astype(np.int64)
        return keys

    def codes_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Inverse of ``vector_keys``: [n] keys -> [n, stages] indices."""
        codes = np.empty((len(keys), self.stages), dtype=index_dtype(self.codebook_size))
        rest = keys.astype(np.int64)
        for stage in range(self.stages):
            codes[:, stage] = rest % self.codebook_size
            rest = rest // self.codebook_size
        return codes


class FloatFormat:
    """MAC entries on disk: K x dim little-endian float32. Float vectors are not counted (no code counts)."""

    def __init__(self, num_slots: int, dim: int):
        self.shape = (num_slots, dim)
        self.bytes = num_slots * dim * 4

    def to_bytes(self, entry: np.ndarray) -> bytes:
        if not np.all(np.isfinite(entry)):
            raise MBCError("a MAC entry holds NaN or infinite values: the model that made it has diverged")
        return np.ascontiguousarray(entry, dtype="<f4").tobytes()

    def from_bytes(self, blob: bytes) -> np.ndarray:
        if len(blob) != self.bytes:
            raise MBCError(f"a stored MAC entry has {len(blob)} bytes, expected {self.bytes}: the bank is damaged")
        return np.frombuffer(blob, dtype="<f4").reshape(self.shape).astype(np.float32)

"""Token ids in fewer than 16 bits each: a static Huffman code fitted on training documents.

A token memory stores 16 bits per token id (SmolLM2's 49,152 tokens), but the tokens of a
document are far from uniform: a unigram model of SQuAD's training paragraphs gives 10.9 bits per
token of a validation paragraph, 11.7 per token of an answer (docs/JOURNAL.md, session 25). A
prefix code with those lengths (Huffman 1952) puts ~40% more tokens into the same bytes.

The code is canonical (codes assigned in order of length, then of symbol), so the code lengths
alone define it: 1 byte per symbol in a checkpoint, and the fingerprint of a bank written with it.
Every token gets a code (counts smoothed by ``smoothing``), and one more symbol, END, closes each
entry, so that an entry of a fixed byte budget holds as many tokens as fit and zero padding after
END is never read. Pure numpy and Python: no torch, as the bank below it.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable

import numpy as np

from mbc.errors import MBCError

MAX_CODE_BITS = 32  # far above what smoothed counts over ~10^5 tokens give (~25)


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length per symbol of a Huffman code for these (positive) counts."""
    if len(counts) < 2:
        raise MBCError(f"a prefix code needs at least two symbols, got {len(counts)}")
    # Nodes 0..n-1 are the symbols; each merge makes a new node, the parent of the two it merged.
    n = len(counts)
    parent = np.full(2 * n - 1, -1, dtype=np.int64)
    heap = [(float(c), i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    for node in range(n, 2 * n - 1):
        (w1, a), (w2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for node in range(2 * n - 3, -1, -1):  # parents come after their children: from the root down
        depth[node] = depth[parent[node]] + 1
    lengths = depth[:n]
    if lengths.max() > MAX_CODE_BITS:
        raise MBCError(f"a code of {int(lengths.max())} bits is too long; smooth the counts more")
    return lengths


class TokenCoder:
    """Token ids <-> bytes under a canonical prefix code of ``vocabulary`` tokens plus END."""

    def __init__(self, lengths: np.ndarray):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.end = len(self.lengths) - 1  # the last symbol closes an entry
        # Canonical codes: sorted by (length, symbol), each the previous plus one, shifted left
        # whenever the length grows.
        order = np.lexsort((np.arange(len(self.lengths)), self.lengths))
        self.codes = np.zeros(len(self.lengths), dtype=np.int64)
        code, previous = 0, int(self.lengths[order[0]])
        for rank, symbol in enumerate(order):
            length = int(self.lengths[symbol])
            if rank:
                code = (code + 1) << (length - previous)
            self.codes[symbol], previous = code, length
        # For decoding: per length, the first code and where its symbols start in ``order``.
        self.order = order
        self.first_code, self.first_rank, self.count = {}, {}, {}
        for rank, symbol in enumerate(order):
            length = int(self.lengths[symbol])
            if length not in self.first_code:
                self.first_code[length], self.first_rank[length] = int(self.codes[symbol]), rank
            self.count[length] = self.count.get(length, 0) + 1

    @classmethod
    def fit(cls, documents: Iterable[list[int]], vocabulary: int, smoothing: float = 0.5) -> "TokenCoder":
        """The code for the token frequencies of ``documents`` (lists of ids below ``vocabulary``);
        END counted once per document, as every entry spends it once."""
        counts = np.full(vocabulary + 1, smoothing, dtype=np.float64)
        for ids in documents:
            np.add.at(counts, np.asarray(ids, dtype=np.int64), 1.0)
            counts[vocabulary] += 1.0
        return cls(huffman_lengths(counts))

    @property
    def vocabulary(self) -> int:
        return self.end

    def bits(self, ids: Iterable[int]) -> int:
        """Bits an entry of these ids takes, END included."""
        return int(self.lengths[np.asarray(list(ids), dtype=np.int64)].sum()) + int(self.lengths[self.end])

    def most_ids(self, budget: int) -> int:
        """The most ids an entry of ``budget`` bytes can hold: all of the shortest code, then END."""
        return (8 * budget - int(self.lengths[self.end])) // int(self.lengths[: self.end].min())

    def most_that_fit(self, ranked: list[int], budget: int) -> list[int]:
        """Of ``ranked`` (ids, best first), the best that fit ``budget`` bytes together, in the
        given order: each is taken if it still fits, so a long code left out leaves room for
        shorter ones after it."""
        room = 8 * budget - int(self.lengths[self.end])
        chosen = []
        for position, token in enumerate(ranked):
            cost = int(self.lengths[token])
            if cost <= room:
                chosen.append(position)
                room -= cost
        return chosen

    def longest_head(self, ids: list[int], budget: int) -> list[int]:
        """The longest head of ``ids`` (in their order) that fits ``budget`` bytes."""
        spent = np.cumsum(self.lengths[np.asarray(ids, dtype=np.int64)])
        return ids[: int(np.searchsorted(spent, 8 * budget - int(self.lengths[self.end]), side="right"))]

    def encode(self, ids: list[int], budget: int) -> bytes:
        """``ids`` and END as exactly ``budget`` bytes (zero bits after END); refused if they do not fit."""
        needed = self.bits(ids)
        if needed > 8 * budget:
            raise MBCError(f"{len(ids)} tokens take {needed} bits, more than the entry's {budget} bytes")
        bits = "".join(format(int(self.codes[s]), f"0{int(self.lengths[s])}b") for s in [*ids, self.end])
        bits = bits.ljust(8 * budget, "0")
        return int(bits, 2).to_bytes(budget, "big")

    def decode(self, data: bytes) -> list[int]:
        """The ids of one entry, up to its END."""
        stream = format(int.from_bytes(data, "big"), f"0{8 * len(data)}b")
        ids, code, length = [], 0, 0
        for bit in stream:
            code, length = (code << 1) | (bit == "1"), length + 1
            offset = code - self.first_code.get(length, code + 1)
            if 0 <= offset < self.count.get(length, 0):
                symbol = int(self.order[self.first_rank[length] + offset])
                if symbol == self.end:
                    return ids
                ids.append(symbol)
                code, length = 0, 0
        raise MBCError("a coded entry ends without its END symbol: it is truncated or was written with another code")

    def fingerprint(self) -> str:
        """What an entry's meaning depends on: the code lengths (which fix the canonical code)."""
        return hashlib.sha256(self.lengths.astype(np.uint8).tobytes()).hexdigest()[:16]

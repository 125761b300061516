"""The bank's two storages side by side, without a model: bytes on disk per document, adds per
second, and what a reader pays to notice a change and re-read the code counts.

    .venv/bin/python bench/storage.py [--documents 20000] [--bank postgresql://...]

Entries are those of the ``cpu`` preset's layout (12 codes of 11 bits and a 32-piece retrieval
key: 17 + 32 bytes), random, with the metadata `mbc ingest` stores (source path, passage, time
added, length); added in transactions of 16 as `mbc ingest` does. PostgreSQL is the ``--bank``
server, or a throwaway one from the pgserver wheel (scripts/local_postgres.py). Prints, per
storage: adds per second, disk bytes per document (the storage's own count: SQLite's file and
WAL, PostgreSQL's relation sizes with indexes), and the median milliseconds of a version check
and of reading the code counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mbc.bank import BankLayout, MemoryBank
from mbc.bank.postgres import free_bank_url

LAYOUT = BankLayout(
    "mbc", num_slots=12, stages=1, codebook_size=2048, dim=576, fingerprint="bench", key_pieces=32, key_codes=256
)
BATCH = 16  # memory/service.py's BATCH_SIZE


def fill(bank: MemoryBank, documents: int, seed: int = 0) -> float:
    """Seconds to add ``documents`` random entries in transactions of ``BATCH``."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for first in range(0, documents, BATCH):
        count = min(BATCH, documents - first)
        texts = [f"passage {first + i} of a benchmark stream" for i in range(count)]
        entries = rng.integers(0, LAYOUT.codebook_size, (count, *LAYOUT.entry_shape)).astype(np.uint16)
        keys = rng.integers(0, LAYOUT.key_codes, (count, LAYOUT.key_pieces)).astype(np.uint8)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        metadata = [
            {"path": f"/home/user/notes/file-{(first + i) // 8}.md", "passage": f"{i % 8 + 1} of 8", "added": now}
            | {"characters": 900}
            for i in range(count)
        ]
        bank.add(texts, entries, metadata, keys)
    return time.perf_counter() - start


def median_ms(call, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(address: str, documents: int) -> dict:
    with MemoryBank.open(address, LAYOUT) as bank:
        seconds = fill(bank, documents)
        sizes = bank.sizes()
        return {
            "adds_per_second": documents / seconds,
            "disk_bytes_per_document": sizes["file_bytes"] / documents,
            "stored_bytes_per_document": sizes["stored_bytes"] / documents,
            "version_ms": median_ms(lambda: bank.version),
            "code_counts_ms": median_ms(bank.code_counts, 5),
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=20000)
    parser.add_argument("--bank", default=None, help="a postgresql:// URL (default: a throwaway local server)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        results["SQLite file"] = measure(str(Path(folder) / "bank.db"), args.documents)
        server = None
        if args.bank is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
            from local_postgres import LocalPostgres

            server = LocalPostgres(Path(folder) / "postgres").start()
        try:
            url = free_bank_url(args.bank or server.url, "bench_storage")
            results["PostgreSQL"] = measure(url, args.documents)
        finally:
            if server is not None:
                server.stop()
    print(f"{args.documents:,} documents of the cpu preset's layout, added {BATCH} per transaction")
    print(f"{'storage':<14}{'adds/s':>9}{'stored B/doc':>14}{'disk B/doc':>12}{'version ms':>12}{'counts ms':>11}")
    for name, r in results.items():
        print(
            f"{name:<14}{r['adds_per_second']:>9.0f}{r['stored_bytes_per_document']:>14.0f}"
            f"{r['disk_bytes_per_document']:>12.0f}{r['version_ms']:>12.3f}{r['code_counts_ms']:>11.2f}"
        )


if __name__ == "__main__":
    main()

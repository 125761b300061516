"""Online adaptation: documents stream into a bank, each compressed once.

``ingest`` compresses only what the bank does not hold yet (by content hash) and appends it, one
transaction per batch, with each document's retrieval key when the model has them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mbc.bank import MemoryBank, content_hash
from mbc.errors import MBCError, check_texts
from mbc.memory.protocol import Memory


@dataclass
class IngestReport:
    added: int  # new documents stored
    duplicates: int  # texts whose content the bank already held
    ids: list[int]  # bank id of every text, in order


@torch.no_grad()
def ingest(
    model: Memory,
    bank: MemoryBank,
    texts: list[str],
    metadata: list[dict] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> IngestReport:
    """Compress and append the texts the bank does not hold yet; a batch is stored atomically."""
    texts = check_texts(texts, "documents")
    metadata = metadata if metadata is not None else [{} for _ in texts]
    if len(metadata) != len(texts):
        raise MBCError(f"ingest() got {len(texts)} documents and {len(metadata)} metadata records")
    hashes = [content_hash(t) for t in texts]
    ids = bank.ids_of_hashes(hashes)  # content hash -> id, filled in as batches are stored
    fresh, seen = [], set(ids)
    for index, digest in enumerate(hashes):
        if digest not in seen:
            seen.add(digest)
            fresh.append(index)
    was_training = model.training
    model.eval()  # never reset codes or update SlotNorm statistics while storing
    for start in tqdm(range(0, len(fresh), batch_size), desc="adapt", unit="batch", disable=not progress):
        chunk = fresh[start : start + batch_size]
        chunk_texts = [texts[i] for i in chunk]
        keys = model.retrieval_keys.keys_of(chunk_texts) if model.retrieval_keys is not None else None
        for index, added in zip(
            chunk, bank.add(chunk_texts, model.compress(chunk_texts), [metadata[i] for i in chunk], keys)
        ):
            ids[hashes[index]] = added.id
    model.train(was_training)
    return IngestReport(len(fresh), len(texts) - len(fresh), [ids[h] for h in hashes])

"""The memory bank: storage at the bottom of the package, SQLite and numpy, no model and no torch.

- ``packing``: code indices in the fewest bits;
- ``formats``: an entry as bytes (MBC indices, MAC float vectors);
- ``layout``: ``BankLayout``, what a bank's entries are and which model's they are;
- ``store``: ``MemoryBank``, the durable SQLite file (one transaction per add or remove, a CRC per
  row, code counts kept beside the rows).

The models write entries through ``BankLayout.of(model)`` and read them back through their codecs
(network/codecs.py); `mbc bank` lists, shows and deletes without either.
"""

from mbc.bank.layout import BankLayout
from mbc.bank.store import (
    FORMAT_VERSION,
    MAX_ID,
    MAX_METADATA_DEPTH,
    Added,
    MemoryBank,
    check_metadata,
    content_hash,
    metadata_json,
)

__all__ = [
    "FORMAT_VERSION",
    "MAX_ID",
    "MAX_METADATA_DEPTH",
    "Added",
    "BankLayout",
    "MemoryBank",
    "check_metadata",
    "content_hash",
    "metadata_json",
]

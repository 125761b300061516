"""MBC: Memory Bank Compression for continual adaptation of LLMs (Katraouras and Rafailidis, 2026).

document -> mbc.network (amortization, codebook) -> codes -> mbc.memory (the bank, its readers)
-> modulation -> mbc.network (aggregation, prefix, KV-LoRA, decoding) -> answer.
Training is mbc.training, data mbc.data, scoring and the paper's evaluation mbc.evaluation.

The names below load on first use, so ``import mbc`` (and ``mbc --help``) does not load torch.
"""

from importlib import import_module

from mbc.errors import MBCError

__version__ = "0.1.0"

_LAZY = {
    "MBCConfig": "mbc.config",
    "MBCModel": "mbc.model",
    "DecodingConfig": "mbc.network.decoding",
    "VectorQuantizer": "mbc.network.codebook",
    "ResidualQuantizer": "mbc.network.codebook",
    "MemoryBank": "mbc.bank",
}
__all__ = ["MBCError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mbc' has no attribute {name!r}")

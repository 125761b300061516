"""MBC: Memory Bank Compression for continual adaptation of LLMs (Katraouras and Rafailidis, 2026)."""

from .codebook import ResidualQuantizer, VectorQuantizer
from .config import MBCConfig
from .decoding import DecodingConfig
from .errors import MBCError
from .model import MBCModel

__all__ = ["DecodingConfig", "MBCConfig", "MBCError", "MBCModel", "ResidualQuantizer", "VectorQuantizer"]
__version__ = "0.1.0"

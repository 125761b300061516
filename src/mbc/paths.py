"""Where MBC keeps what it makes once and reuses: converted models and trained adapters."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$MBC_CACHE, else $XDG_CACHE_HOME/mbc, else ~/.cache/mbc."""
    root = os.environ.get("MBC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mbc"
    return Path(root)

"""Where MBC keeps what it makes once and reuses (converted models, trained adapters), and the folders it writes."""

from __future__ import annotations

import os
from pathlib import Path

from mbc.errors import MBCError


def cache_dir() -> Path:
    """$MBC_CACHE, else $XDG_CACHE_HOME/mbc, else ~/.cache/mbc."""
    root = os.environ.get("MBC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mbc"
    return Path(root)


def writable_folder(path: str | Path) -> Path:
    """``path`` as a folder that exists and can be written, checked before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MBCError(f"cannot use {path} as the output folder: {error.strerror}") from error
    if not os.access(path, os.W_OK):
        raise MBCError(f"cannot write into the output folder {path}")
    return path

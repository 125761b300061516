"""Checkpoints: the trainable tensors as safetensors plus the config as JSON, never pickles.

A checkpoint folder holds ``model.safetensors`` (every trainable tensor and the codebook's usage
statistics; the frozen backbones are named in the config instead) and ``mbc_config.json`` (the
``MBCConfig`` and the codebook fingerprint, checked on loading so that a damaged codebook is
refused rather than silently giving stored indices another meaning).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from mbc.config import MBCConfig
from mbc.errors import MBCError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "mbc_config.json"


def save(model, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"config": model.config.to_dict(), "codebook_fingerprint": model.codebook_fingerprint()}
    # Temporary names + os.replace: a crash mid-save leaves the previous checkpoint whole.
    save_file(model.trainable_state_dict(), folder / (WEIGHTS_NAME + ".tmp"), metadata={"format": "pt"})
    (folder / (CONFIG_NAME + ".tmp")).write_text(json.dumps(meta, indent=2))
    os.replace(folder / (WEIGHTS_NAME + ".tmp"), folder / WEIGHTS_NAME)
    os.replace(folder / (CONFIG_NAME + ".tmp"), folder / CONFIG_NAME)


def read_config(folder: str | Path) -> MBCConfig:
    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists():
        raise MBCError(f"{folder} is not an MBC checkpoint: {CONFIG_NAME} is missing (save one with save_pretrained)")
    return MBCConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text())["config"])


def load_state(model, folder: str | Path) -> None:
    """Load a checkpoint's trainable tensors into ``model``, checking names and codebook fingerprint."""
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).exists():
            raise MBCError(f"{folder} is not an MBC checkpoint: {name} is missing (save one with save_pretrained)")
    state = load_file(folder / WEIGHTS_NAME)
    expected = set(model.trainable_state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise MBCError(f"checkpoint {folder} does not match its config: missing {missing[:5]}, unexpected {extra[:5]}")
    model.load_state_dict(state, strict=False)
    if model.codebook_fingerprint() != json.loads((folder / CONFIG_NAME).read_text()).get("codebook_fingerprint"):
        raise MBCError(
            f"the codebook in {folder / WEIGHTS_NAME} does not match the fingerprint in {CONFIG_NAME}: "
            "the checkpoint is corrupted"
        )

"""Checkpoints: the trainable tensors as safetensors plus the config as JSON, never pickles.

A checkpoint folder holds ``model.safetensors`` (every trainable tensor and the codebook's usage
statistics; the frozen backbones are named in the config instead) and ``mbc_config.json`` (the
``MBCConfig``, the SHA-256 of the tensor file and the codebook fingerprint). Both are checked on
loading, so a damaged checkpoint is refused rather than giving stored indices another meaning.

A folder is written whole (``replacing``): its files go into a hidden sibling, which then takes the
folder's place. A crash leaves either the old folder or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mbc.config import MBCConfig
from mbc.errors import MBCError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "mbc_config.json"


def _partial(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.partial")


def _previous(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.previous")


def resolve(folder: str | Path) -> Path:
    """Where the folder's last complete version is: itself, or (after a crash between the two renames
    of ``replacing``) the previous version beside it."""
    folder = Path(folder)
    return _previous(folder) if not folder.exists() and _previous(folder).exists() else folder


def _sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def replacing(folder: str | Path) -> Iterator[Path]:
    """Write the files of ``folder`` into the yielded folder; on success it replaces ``folder`` whole."""
    folder = Path(folder)
    partial, previous = _partial(folder), _previous(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        for path in partial.iterdir():
            _sync(path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if previous.exists():
        if folder.exists():  # a finished swap's leftover
            shutil.rmtree(previous)
        else:  # an unfinished swap: the previous version is the last whole one
            os.rename(previous, folder)
    if folder.exists():
        os.rename(folder, previous)
    os.rename(partial, folder)  # from here on the new version is the checkpoint
    _sync(folder.parent)
    shutil.rmtree(previous, ignore_errors=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write(model, folder: Path) -> None:
    """The checkpoint's files, into an existing (fresh) folder."""
    save_file(model.trainable_state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    meta = {
        "config": model.config.to_dict(),
        "sha256": {WEIGHTS_NAME: sha256_of(folder / WEIGHTS_NAME)},
        "codebook_fingerprint": model.codebook_fingerprint(),
    }
    if model.trained_on:
        meta["trained_on"] = model.trained_on
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))


def save(model, folder: str | Path) -> None:
    with replacing(folder) as partial:
        write(model, partial)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a checkpoint file, or one line saying why not."""
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MBCError(f"{path} is not readable JSON ({error}): the {what} is damaged") from error
    if not isinstance(values, dict):
        raise MBCError(f"{path} holds {type(values).__name__}, not a JSON object: the {what} is damaged")
    return values


def _meta(folder: Path) -> dict:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).exists():
            raise MBCError(f"{folder} is not an MBC checkpoint: {name} is missing (save one with save_pretrained)")
    meta = read_json(folder / CONFIG_NAME, "checkpoint")
    if not isinstance(meta.get("config"), dict):
        raise MBCError(f"{folder / CONFIG_NAME} has no 'config' object: the checkpoint is damaged")
    return meta


def read_config_dict(folder: str | Path) -> dict:
    """The config a checkpoint was saved with, as stored (an MBC config, or a token memory's)."""
    return _meta(resolve(folder))["config"]


def trained_on(folder: str | Path) -> str | None:
    """What the model in ``folder`` was trained on, as its training recorded it (None: not recorded)."""
    return _recorded_training(_meta(resolve(folder)))


def _recorded_training(meta: dict) -> str | None:
    about = meta.get("trained_on")
    return about if isinstance(about, str) else None


def read_config(folder: str | Path) -> MBCConfig:
    folder = resolve(folder)
    config = read_config_dict(folder)
    if config.get("kind") == "token_memory":
        raise MBCError(
            f"{folder} holds a token memory, not an MBC adapter: load it with TokenMemory.from_pretrained "
            "(in `mbc eval`, give it as --tokens)"
        )
    try:
        return MBCConfig.from_dict(config)
    except MBCError as error:
        raise MBCError(f"{folder / CONFIG_NAME}: {error}") from error


def load_tensors(path: Path, expected_sha256: str | None) -> dict:
    """A safetensors file, checked against the digest recorded when it was written."""
    if expected_sha256 is not None and sha256_of(path) != expected_sha256:
        raise MBCError(f"{path} does not match the SHA-256 recorded when it was saved: the file is damaged")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise MBCError(f"{path} is not a readable safetensors file ({error})") from error


# Tensor names of checkpoints saved before the frozen LLM and the retrieval keys were components of
# their own (network/frozen_llm.py, network/retrieval.py): old prefix -> new prefix.
RENAMED = (
    ("base.llm.", "llm.model."),  # a token memory's reader, when its base was a whole MBC model
    ("base.retrieval_keys.", "retrieval_keys.quantizer."),
    ("llm.", "llm.model."),
    ("retrieval_keys.", "retrieval_keys.quantizer."),
    ("code_lengths", "prefix_code.lengths"),  # a token memory's prefix code, before MBC shared it
)


def _renamed(state: dict, expected: dict) -> dict:
    """``state`` with names saved by an earlier layout of the model mapped to this one's."""
    if set(state) == set(expected):
        return state

    def current(name: str) -> str:
        if name in expected:
            return name
        return next((new + name[len(old) :] for old, new in RENAMED if name.startswith(old)), name)

    return {current(name): tensor for name, tensor in state.items()}


def load_state(model, folder: str | Path, leave_out: tuple[str, ...] = ()) -> None:
    """Load a checkpoint's trainable tensors into ``model``, checking digest, names, shapes and codebook.
    ``leave_out``: prefixes of tensor names not to load (a MAC model started from a MBC state: "quantizer.")."""
    folder = resolve(folder)
    meta = _meta(folder)
    state = load_tensors(folder / WEIGHTS_NAME, (meta.get("sha256") or {}).get(WEIGHTS_NAME))
    state = {name: tensor for name, tensor in state.items() if not name.startswith(leave_out)}
    expected = model.trainable_state_dict()
    state = _renamed(state, expected)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise MBCError(f"checkpoint {folder} does not match its config: missing {missing[:5]}, unexpected {extra[:5]}")
    wrong = [
        f"{n} {tuple(state[n].shape)} (expected {tuple(t.shape)})"
        for n, t in expected.items()
        if state[n].shape != t.shape
    ]
    if wrong:
        raise MBCError(
            f"checkpoint {folder} does not match its config: tensors of other shapes: {', '.join(wrong[:3])}"
        )
    model.load_state_dict(state, strict=False)
    model.trained_on = _recorded_training(meta) or model.trained_on
    if not leave_out and model.codebook_fingerprint() != meta.get("codebook_fingerprint"):
        raise MBCError(
            f"the codebook in {folder / WEIGHTS_NAME} does not match the fingerprint in {CONFIG_NAME}: "
            "the checkpoint is corrupted"
        )

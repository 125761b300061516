"""Resumable training state without pickles: tensors in safetensors, everything else in JSON.

Holds the optimizer's per-parameter tensors (Adam's moments and step), the scheduler's state, the
progress (optimizer step, epoch, batch within the epoch, best scores) and the RNG states.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mbc.checkpoint import load_tensors, read_json, resolve, sha256_of
from mbc.errors import MBCError

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


def save_training_state(folder: Path, optimizer, scheduler, progress: dict) -> None:
    """Into a folder being written (checkpoint.replacing), beside the model's files."""
    state = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(tensors, folder / STATE_TENSORS)
    meta = {
        "sha256": sha256_of(folder / STATE_TENSORS),
        "param_groups": state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "progress": progress,
        "rng_python": repr(random.getstate()),
        "rng_numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
    }
    (folder / STATE_JSON).write_text(json.dumps(meta))


def has_training_state(folder: Path) -> bool:
    folder = resolve(folder)
    return (folder / STATE_JSON).exists() and (folder / STATE_TENSORS).exists()


def saved_progress(folder: Path) -> dict:
    """The progress recorded with the training state (step, epoch, the run's settings and data)."""
    meta = read_json(resolve(folder) / STATE_JSON, "training state")
    if not isinstance(meta.get("progress"), dict):
        raise MBCError(f"{resolve(folder) / STATE_JSON} has no progress record: the training state is damaged")
    return meta["progress"]


def load_training_state(folder: Path, optimizer, scheduler, groups: int | None = None) -> dict:
    """Restore optimizer, scheduler and RNGs; returns the saved progress. ``groups``: restore only
    the optimizer's first parameter groups (a MAC run started from a MBC state leaves the codebook's)."""
    folder = resolve(folder)
    meta = read_json(folder / STATE_JSON, "training state")
    tensors = load_tensors(folder / STATE_TENSORS, meta.get("sha256"))
    try:
        param_groups = meta["param_groups"][:groups]
        kept = {index for group in param_groups for index in group["params"]}
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                if int(index) in kept:
                    slots.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": slots, "param_groups": param_groups})
        scheduler.load_state_dict(_first_groups(meta["scheduler"], len(meta["param_groups"]), groups))
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(python_rng_state(meta["rng_python"]))
        numpy_state = meta["rng_numpy"]
        np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
        return meta["progress"]

    except (KeyError, ValueError, TypeError, RuntimeError, SyntaxError) as error:
        raise MBCError(
            f"the training state in {folder} does not fit this run ({type(error).__name__}: {error})"
        ) from error


def _first_groups(scheduler_state: dict, saved_groups: int, groups: int | None) -> dict:
    """The scheduler's state for the first ``groups`` parameter groups: its per-group lists (base and
    last rates, rate functions) cut to them."""
    return {
        key: value[:groups] if isinstance(value, list) and len(value) == saved_groups else value
        for key, value in scheduler_state.items()
    }


def python_rng_state(text: str):
    # random.getstate() is a tuple of ints and a tuple; ast.literal_eval reads its repr safely.
    import ast

    return ast.literal_eval(text)

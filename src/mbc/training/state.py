"""Resumable training state without pickles: tensors in safetensors, everything else in JSON.

Holds the optimizer's per-parameter tensors (Adam's moments and step), the scheduler's state, the
progress (optimizer step, epoch, batch within the epoch, best scores) and the RNG states.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


def save_training_state(folder: Path, optimizer, scheduler, progress: dict) -> None:
    state = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {
        "param_groups": state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "progress": progress,
        "rng_python": repr(random.getstate()),
        "rng_numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
    }
    save_file(tensors, folder / (STATE_TENSORS + ".tmp"))
    (folder / (STATE_JSON + ".tmp")).write_text(json.dumps(meta))
    os.replace(folder / (STATE_TENSORS + ".tmp"), folder / STATE_TENSORS)
    os.replace(folder / (STATE_JSON + ".tmp"), folder / STATE_JSON)


def has_training_state(folder: Path) -> bool:
    return (folder / STATE_JSON).exists() and (folder / STATE_TENSORS).exists()


def load_training_state(folder: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNGs; returns the saved progress."""
    tensors = load_file(folder / STATE_TENSORS)
    meta = json.loads((folder / STATE_JSON).read_text())
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_python_state(meta["rng_python"]))
    numpy_state = meta["rng_numpy"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    return meta["progress"]


def _python_state(text: str):
    # random.getstate() is a tuple of ints and a tuple; ast.literal_eval reads its repr safely.
    import ast

    return ast.literal_eval(text)

"""The resumable training loop of a token memory's adapters: the reader's KV-LoRA
(training/token_memory.py) and the written codes' writer beside it (training/vocabulary_codes.py).
Adam over the given parameters, saved every few minutes, on Ctrl-C / SIGTERM and at the end, and
continued from there when the same command runs again."""

from __future__ import annotations

import hashlib
import random
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mbc.errors import MBCError
from mbc.settings import Field, settings
from mbc.token_memory import TokenMemory
from mbc.training.run import RunFolder, StopRequests, refuse_other_settings
from mbc.training.state import (
    has_training_state,
    load_training_state,
    python_rng_state,
    saved_progress,
)


def kv_lora(model: TokenMemory) -> list[nn.Parameter]:
    adapters = model.llm.lora_parameters()
    if not adapters:
        raise MBCError("the token memory's base LLM carries no KV-LoRA to train: give its base config lora_layers > 0")
    return adapters


@settings
class AdapterRun:
    """How ``train_adapters`` steps, and where it saves."""

    batch_size: Annotated[int, Field(ge=1)] = 8
    learning_rate: Annotated[float, Field(gt=0)] = 3e-4
    # The written codes' layer (vocabulary_codes.py) starts at the kept tokens, which are ~2.1 apart
    # (SmolLM2, L2 to the nearest other token) while it reads 1,152 standardised features: at the
    # reader's rate a few Adam steps carry every code off its token.
    writer_learning_rate: Annotated[float, Field(gt=0)] = 1e-5
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    mixed_precision: Literal["no", "bf16"] = "no"
    save_to: str | Path | None = None
    save_every_minutes: Annotated[float, Field(ge=0)] = 10.0


def train_adapters(
    model: TokenMemory,
    parameters: list,
    examples: list,
    batch_loss,
    steps: int,
    run: AdapterRun,
    settings: dict,
    what: str,
) -> list[float]:
    """Adam on ``parameters`` for ``steps`` batches of ``examples`` (epoch after epoch, each in its own
    order), ``batch_loss(batch)`` the loss of one; saved into ``run.save_to`` every
    ``run.save_every_minutes``, on SIGINT / SIGTERM and at the end, and continued from there when the
    saved run's ``settings`` are this one's. The base LLM's KV-LoRA is among the parameters, so
    the saved memory says its reader is trained."""
    optimizer = torch.optim.Adam(parameters, lr=run.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant; saved with the state
    settings = {
        "rows": len(examples),
        "batch_size": run.batch_size,
        "learning_rate": run.learning_rate,
        "seed": run.seed,
        "mixed_precision": run.mixed_precision,
        **settings,
    }
    shuffle = random.Random(run.seed)
    progress = {"step": 0, "order": [], "losses": [], "shuffle": repr(shuffle.getstate()), "settings": settings}
    save_to = run.save_to
    if save_to is not None and has_training_state(Path(save_to)):
        progress = resumed_run(Path(save_to), optimizer, schedule, settings, what)
        shuffle.setstate(python_rng_state(progress["shuffle"]))
    order, losses = progress["order"], progress["losses"]

    def state() -> dict:
        return {**progress, "shuffle": repr(shuffle.getstate())}

    # Without save_to there is nowhere to save: no periodic, signal or final saves.
    saves = None if save_to is None else RunFolder(save_to, model, optimizer, schedule, state, run.save_every_minutes)

    def save() -> None:
        model.config = replace(model.config, trained_reader=True)
        saves.save()

    model.train()
    # Ctrl-C and SIGTERM stop at the end of a step, saved, where there is somewhere to save to.
    with torch.enable_grad(), StopRequests() if saves is not None else nullcontext() as stops:
        bar = tqdm(range(progress["step"], steps), desc=what, initial=progress["step"], total=steps)
        for step in bar:
            # The adapters' dropout draws from torch's global generator: seeded by the step, a run
            # continued after a stop draws the masks an uninterrupted one would, whatever ran before.
            torch.manual_seed(run.seed + step)
            if len(order) < run.batch_size:
                order += shuffle.sample(range(len(examples)), len(examples))
            batch, order[:] = [examples[i] for i in order[: run.batch_size]], order[run.batch_size :]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.mixed_precision == "bf16"):
                loss = batch_loss(batch).float()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress["step"] = step + 1
            if step % 10 == 9:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
            if stops is not None and stops.signum is not None:
                save()
                where = f"{what} step {progress['step']} of {steps}"
                raise stops.interrupted(where, f"the memory and its {what} are saved in {save_to}")
            if saves is not None and saves.due():
                save()
    model.config = replace(model.config, trained_reader=progress["step"] > 0 or model.config.trained_reader)
    if saves is not None:
        save()
    model.eval()
    return losses


def fingerprint_texts(texts) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def resumed_run(folder: Path, optimizer, schedule, settings: dict, what: str) -> dict:
    """The saved run's progress, its optimizer and RNG states restored; one line naming what
    differs when the run's settings (or the rows and kept tokens it reads) are not the saved run's."""
    refuse_other_settings(folder, f"a {what} trained", saved_progress(folder).get("settings", {}), settings)
    return load_training_state(folder, optimizer, schedule)

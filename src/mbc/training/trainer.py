"""Meta-training MBC (docs/METHOD.md), on accelerate.

Each batch is a set of (document, question, answer) rows; its distinct documents are amortized
and quantized into the bank that all of its questions read; the loss is the QA negative
log-likelihood of the answer tokens plus lambda times the VQ loss, or what the schedule
(schedule.py) says for that step (objectives.py). Only the adapter trains: the base LLM is frozen
apart from KV-LoRA.

Multi-process: every process builds the same model from the same seed, takes every world_size-th
batch of the same shuffled order, and accelerate averages the gradients; the codebook's usage
counts are summed across processes and dead-code replacements come from process 0, so every
process keeps the same codebook.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import signal
import threading
import time
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from mbc import checkpoint
from mbc.config import MBCConfig
from mbc.data import QAExample, documents
from mbc.errors import MBCError
from mbc.evaluation.validation import evaluate
from mbc.model import MBCModel
from mbc.paths import writable_folder
from mbc.settings import Field, settings
from mbc.training.activations import FrozenActivations, FrozenStore
from mbc.training.allocator import keep_large_allocations_on_mmap
from mbc.training.objectives import StepObjective
from mbc.training.schedule import ProbeTokens, Schedule
from mbc.training.state import has_training_state, load_training_state, save_training_state, saved_progress

BEST = {"em": "best-em", "f1": "best-f1", "loss": "best-loss"}


@settings
class TrainConfig:
    output_dir: str = "runs/mbc"
    batch_size: Annotated[int, Field(ge=1)] = 8  # rows per process per micro-batch
    grad_accumulation: Annotated[int, Field(ge=1)] = 1
    learning_rate: Annotated[float, Field(ge=0)] = 1e-5
    encoder_learning_rate: Annotated[float, Field(ge=0)] | None = (
        None  # for the pretrained encoders; None = learning_rate
    )
    codebook_learning_rate: Annotated[float, Field(ge=0)] | None = None  # for the codebook(s); None = learning_rate
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01
    lr_schedule: Literal["constant", "cosine", "linear"] = (
        "constant"  # after warmup: "constant" (the reference), "cosine" or "linear" decay to 0 at the last step
    )
    max_grad_norm: Annotated[float, Field(ge=0)] = 100.0
    epochs: Annotated[int, Field(ge=1)] = 50
    max_steps: Annotated[int, Field(ge=1)] | None = None  # optimizer steps; overrides epochs when set
    max_minutes: Annotated[float, Field(ge=0)] | None = (
        None  # stop (then validate and save) after this much training time
    )
    backprop_keep: Annotated[float, Field(ge=0, le=1)] = 1.0
    bank_curriculum_steps: Annotated[int, Field(ge=0)] = (
        0  # > 0: each question's bank grows from its own document to the whole batch over these steps
    )
    float_memory_steps: Annotated[int, Field(ge=0)] = (
        0  # > 0 (MBC): the bank holds float vectors for these steps, then the codebook is k-means-fitted to them
    )
    codebook_fit_documents: Annotated[int, Field(ge=1)] = (
        1000  # training documents the codebook is fitted on at the end of float_memory_steps
    )
    probe_steps: Annotated[int, Field(ge=0)] = (
        0  # > 0: the first N steps train the reading path on the answer probe, not the QA loss (objectives.py)
    )
    probe_tokens: ProbeTokens = (
        "first"  # the probe's targets: the answer's "first" token, or "all" (vector k -> token k)
    )
    probe_weight: Annotated[float, Field(ge=0)] = (
        0.0  # after probe_steps: loss = QA + probe_weight x probe (0 = the QA loss alone)
    )
    hold_reading_steps: Annotated[int, Field(ge=0)] = (
        0  # the first N QA steps after probe_steps train only the LLM side (schedule.py)
    )
    teach_reading_steps: Annotated[int, Field(ge=0)] = (
        0  # the last N probe steps also teach the LLM side to read the answer (schedule.py)
    )
    # Every N steps also compute the step's loss with each question reading another batch document
    # (no gradient; needs retrieval keys with top-1) and log "reading_gap", the difference: a rise
    # says the memory is being read long before validation can. 0: never.
    gap_every: Annotated[int, Field(ge=0)] = 5
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # "no", "bf16", "fp16"
    # Keep what frozen layers make of each row and text for later epochs: the LLM's below the first
    # prefix / KV-LoRA, the encoders' below encoder_trained_layers (activations.py); off where nothing is below.
    cache_frozen_activations: bool = True
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    log_every: Annotated[int, Field(ge=1)] = 10
    eval_every: Annotated[int, Field(ge=1)] = 200  # optimizer steps; validation also runs at the end
    # Validation questions (all their documents form the bank); None: all, 0: no validation.
    eval_questions: Annotated[int, Field(ge=0)] | None = 500
    validate_control: bool = True  # also validate with a bank of unrelated training documents: the reading gap
    resume: bool = True
    save_every_minutes: Annotated[float, Field(ge=0)] = (
        5.0  # also save a resumable state this often (wall time), and on SIGINT / SIGTERM
    )
    save_best: bool = True  # also keep best-em / best-f1 / best-loss checkpoints beside last (each a full copy)
    # MBC: also keep the state at the end of the float-memory warm start, before the codebook is
    # fitted, in <output_dir>/float-memory: until then MBC computes what MAC does, so a MAC run with
    # the same settings can start there (train's start_from) instead of repeating those steps.
    keep_float_memory_state: bool = False
    return_freed_memory: bool = (
        False  # lower peak memory for some speed (training/allocator.py: ~5% less peak memory, 15-30% slower on CPU)
    )
    wandb_project: str | None = None  # also log to Weights & Biases (pip install wandb); off by default
    extra: dict = field(default_factory=dict)  # free-form notes recorded in the run's config


SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}  # ours -> transformers' names


def _batches(examples: list[QAExample], batch_size: int, seed: int, epoch: int) -> list[list[QAExample]]:
    order = list(examples)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def parameter_groups(model: MBCModel, config: TrainConfig) -> list[dict]:
    # The pretrained encoders may want a gentler rate than the freshly initialised modules, and the
    # codebook a faster one: Adam moves a code by about the learning rate per step, and codes
    # must keep up with the encoder outputs they stand for, or all of them snap to a few codes.
    rates = {
        "fresh": config.learning_rate,
        "encoder": config.encoder_learning_rate or config.learning_rate,
        "codebook": config.codebook_learning_rate or config.learning_rate,
    }
    groups = {name: [] for name in rates}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            kind = "encoder" if ".encoder." in name else "codebook" if name.startswith("quantizer.") else "fresh"
            groups[kind].append(parameter)
    return [{"params": params, "lr": rates[kind]} for kind, params in groups.items() if params]


def validation_metrics(model: MBCModel, rows: list[QAExample], unrelated: list[str], config: TrainConfig) -> dict:
    """EM, F1, lenient EM and QA loss on ``rows`` read from their own documents; with
    ``validate_control``, also the reading gap: each minus the same read from as many ``unrelated``
    documents (loss: unrelated minus own). The gap is what says the memory is used."""
    metrics = evaluate(model, rows).metrics
    if not config.validate_control:
        return metrics
    control = evaluate(model, rows, bank_documents=unrelated[: len(documents(rows))]).metrics
    gaps = {f"gap_{key}": metrics[key] - control[key] for key in ("em", "f1", "lenient_em")}
    return {**metrics, **gaps, "gap_loss": control["loss"] - metrics["loss"]}


def make_optimizer(model: MBCModel, config: TrainConfig) -> torch.optim.Optimizer:
    # fused: one kernel over every tensor instead of a loop over 364 of them; on a 2-core CPU the
    # update of the cpu preset's 92M trainable parameters: 46 ms instead of 199 (bench/optimizer.py, 2026-12-02).
    return torch.optim.Adam(parameter_groups(model, config), lr=config.learning_rate, fused=True)


def _anywhere(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Each flag, true if it is true in any process: every process must stop or save at the same step,
    or the others wait forever in the next all-reduce."""
    values = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(values, reduction="sum")]


# Settings a run may change when it resumes: how long it runs, how it reports, where it logs.
RESUMABLE = {
    "output_dir",
    "epochs",
    "max_steps",
    "max_minutes",
    "eval_every",
    "log_every",
    "eval_questions",
    "validate_control",
    "resume",
    "save_best",
    "keep_float_memory_state",
    "save_every_minutes",
    "return_freed_memory",
    "wandb_project",
    "extra",
}


def run_identity(model_config: MBCConfig, config: TrainConfig, rows: list[QAExample]) -> dict:
    """What a resumed run must share with the run that saved it: every other setting, and the data."""
    data = json.dumps([(r.document, r.question, list(r.answers)) for r in rows])
    identity = {
        "model": model_config.to_dict(),
        "train": {k: v for k, v in asdict(config).items() if k not in RESUMABLE},
        "data": hashlib.sha256(data.encode()).hexdigest(),
    }
    return json.loads(json.dumps(identity))  # as it reads back from the saved JSON


# What only a codebook uses: a MAC run may start from a MBC run's float-memory state whatever these are.
CODEBOOK_SETTINGS = {
    "quantize",
    "codebook_size",
    "codebook_stages",
    "codebook_metric",
    "codebook_update",
    "beta",
    "vq_weight",
    "ema_decay",
    "dead_threshold",
}
FLOAT_MEMORY_STATE = "float-memory"  # the folder keep_float_memory_state writes


def _without_codebook(identity: dict) -> dict:
    return {**identity, "model": {k: v for k, v in identity["model"].items() if k not in CODEBOOK_SETTINGS}}


def _start_from_float_memory(folder: Path, model: MBCModel, optimizer, scheduler, identity: dict) -> dict:
    """Continue a MBC run's float-memory state as a MAC run: every tensor but the codebook's, the
    optimizer without the codebook's group (the last), the scheduler, RNGs and progress."""
    if model.config.quantize:
        raise MBCError("only a MAC run (quantize=false) can start from a MBC run's float-memory state")
    if not has_training_state(folder):
        raise MBCError(
            f"{folder} holds no float-memory state to start from: train the MBC run with "
            "keep_float_memory_state=true first"
        )
    saved = saved_progress(folder).get("identity")
    try:
        _check_same_run(saved and _without_codebook(saved), _without_codebook(identity))
        checkpoint.load_state(model, folder, leave_out=("quantizer.",))
        return load_training_state(folder, optimizer, scheduler, groups=len(optimizer.param_groups))
    except MBCError as error:
        raise MBCError(f"cannot start from {folder}: {error}") from error


def _check_same_run(saved: dict | None, current: dict) -> None:
    if saved is None:  # saved before runs recorded what they were
        return
    differing = [
        f"{key} {saved[part].get(key)!r} -> {current[part].get(key)!r}"
        for part in ("model", "train")
        for key in sorted(set(saved[part]) | set(current[part]))
        if saved[part].get(key) != current[part].get(key)
    ]
    if saved["data"] != current["data"]:
        differing.append("other training rows")
    if differing:
        raise MBCError(
            f"it holds a run with other settings (saved -> now): {'; '.join(differing[:6])}; "
            "continue it with the same settings and data"
        )


class TrainingInterrupted(MBCError):
    """Training stopped on SIGINT / SIGTERM after saving a resumable state."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal


class StopRequests:
    """SIGINT and SIGTERM ask training to stop at the end of the current step, saved; a second
    SIGINT stops at once (KeyboardInterrupt), losing only what the last save did not hold."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = None, {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # only there can Python take signals
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class MetricsLog:
    """metrics.jsonl in the run folder: one JSON object per logged step or validation (and the
    same to the accelerator's trackers, if any)."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path, self.accelerator = path, accelerator

    def write(self, **record) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        numbers = {f"{record['kind']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
        self.accelerator.log(numbers, step=record["step"])


def train(
    model_config: MBCConfig,
    config: TrainConfig,
    train_rows: list[QAExample],
    validation_rows: list[QAExample],
    frozen_store: FrozenStore | None = None,
    start_from: Path | None = None,
    trained_on: str | None = None,
) -> dict:
    """Train, validate and checkpoint into ``config.output_dir``; returns the final validation metrics.
    ``frozen_store``: frozen work kept by an earlier training on the same backbones, to reuse (activations.py).
    ``start_from`` (MAC): a MBC run's float-memory state (keep_float_memory_state) to begin at when
    this run has no state of its own to resume. ``trained_on``: a line saying what the rows are, kept
    in every checkpoint for its users (``describe_training``)."""
    if config.return_freed_memory:
        keep_large_allocations_on_mmap()
    if len(train_rows) < config.batch_size:
        raise MBCError(f"{len(train_rows)} training rows is fewer than one batch of {config.batch_size}")
    # cpu=True without a GPU: processes started by `accelerate launch --multi_gpu` (torchrun) then
    # join one gloo process group instead of each running alone.
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accumulation,
        mixed_precision=config.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with="wandb" if config.wandb_project else None,
    )
    if config.wandb_project:
        accelerator.init_trackers(
            config.wandb_project, config={"model": model_config.to_dict(), "train": asdict(config)}
        )
    set_seed(config.seed)
    out = Path(config.output_dir)
    main = accelerator.is_main_process
    if main:
        writable_folder(out)
        (out / "run_config.json").write_text(
            json.dumps({"model": model_config.to_dict(), "train": asdict(config)}, indent=2)
        )

    model = MBCModel.build(model_config)
    model.trained_on = trained_on
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, config)
    world = accelerator.num_processes
    batches_per_epoch = len(_batches(train_rows, config.batch_size, config.seed, 0)) // world
    total_steps = config.max_steps or max(1, config.epochs * batches_per_epoch // config.grad_accumulation)
    schedule = Schedule(config, total_steps, model_config.quantize)
    scheduler = get_scheduler(
        SCHEDULES[config.lr_schedule],
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )

    train_documents = list(dict.fromkeys(row.document for row in train_rows))  # distinct, in order
    progress = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "best": {"em": -1.0, "f1": -1.0, "loss": float("inf")},
        "train_seconds": 0.0,
    }
    last = out / "last"
    identity = run_identity(model_config, config, train_rows)
    if config.resume and has_training_state(last):
        try:
            _check_same_run(saved_progress(last).get("identity"), identity)
            model.load_trainable_state(last)
            progress = load_training_state(last, optimizer, scheduler)
        except MBCError as error:
            raise MBCError(
                f"cannot resume from {last}: {error}. Train into a new --output folder, "
                "or pass --train-set resume=false to start over"
            ) from error
        accelerator.print(f"resumed from {last} at step {progress['step']}")
    elif start_from is not None:
        progress = _start_from_float_memory(Path(start_from), model, optimizer, scheduler, identity)
        accelerator.print(f"started from the float-memory state in {start_from} at step {progress['step']}")
    progress["identity"] = identity
    if model.retrieval_keys is not None and not bool(model.retrieval_keys.fitted):
        # Every process fits the same centroids: same documents, same seed.
        model.fit_retrieval_keys(train_documents)
    frozen = FrozenActivations(model, frozen_store) if config.cache_frozen_activations else None
    objective, optimizer = accelerator.prepare(StepObjective(model, frozen), optimizer)
    log = MetricsLog(out / "metrics.jsonl", accelerator)

    def validate_and_save() -> dict:
        metrics = {}
        rows = validation_rows if config.eval_questions is None else validation_rows[: config.eval_questions]
        if main and rows:
            # During the warm start the codebook is not fitted yet: a bank stored through it means nothing.
            metrics = validation_metrics(model, rows, train_documents, config) if not float_memory else {}
            log.write(kind="validation", step=progress["step"], **metrics)
            for key, folder in BEST.items():
                better = metrics and (
                    metrics[key] < progress["best"][key] if key == "loss" else metrics[key] > progress["best"][key]
                )
                if better:
                    progress["best"][key] = metrics[key]
                    if config.save_best:
                        model.save_pretrained(out / folder)
            accelerator.print(
                f"step {progress['step']}: validation {json.dumps({k: round(v, 3) for k, v in metrics.items()})}"
            )
        save_last()
        return metrics

    saved_at = time.perf_counter()

    def save_state(into: Path) -> None:
        """The model and everything needed to continue, written whole (checkpoint.replacing)."""
        if main:
            with checkpoint.replacing(into) as folder:
                checkpoint.write(model, folder)
                save_training_state(folder, optimizer, scheduler, progress)
        accelerator.wait_for_everyone()

    def save_last() -> None:
        nonlocal saved_at
        save_state(last)
        saved_at = time.perf_counter()

    bar = tqdm(total=total_steps, initial=progress["step"], disable=not main, desc="train", dynamic_ncols=True)
    # True until the codebook is fitted to the encoder's vectors as they are then: when the
    # schedule's float-memory steps are done, or before saving a run that stops earlier.
    float_memory = schedule.float_memory(progress["step"])
    objective.train()
    started, seconds_before = time.perf_counter(), progress["train_seconds"]
    losses = ("loss", "qa", "vq", "perplexity", "probe")

    def empty_window() -> dict:
        """What is summed between two log lines: each loss, the measured reading gaps, rows and micro-steps."""
        return {
            **dict.fromkeys(losses, 0.0),
            "reading_gap": 0.0,
            "gaps": 0,
            "rows": 0,
            "micro": 0,
            "time": time.perf_counter(),
        }

    window = empty_window()
    finished = progress["step"] >= total_steps
    if finished:
        accelerator.print(f"{last} already holds all {total_steps} steps of this run: validating it again")
    stops = StopRequests()
    with stops:
        while not finished:
            epoch_batches = _batches(train_rows, config.batch_size, config.seed, progress["epoch"])[
                : batches_per_epoch * world
            ]
            mine = epoch_batches[accelerator.process_index :: world]
            for batch in mine[progress["batch"] :]:
                documents = list(dict.fromkeys(row.document for row in batch))
                own = [documents.index(row.document) for row in batch]
                with accelerator.accumulate(objective):
                    step = schedule.at(progress["step"], len(documents), float_memory)
                    output = objective(documents, [r.question for r in batch], [r.answers[0] for r in batch], own, step)
                    accelerator.backward(output.loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                progress["batch"] += 1
                values = (output.loss, output.qa_loss, output.vq_loss, output.perplexity, output.probe_loss)
                for key, value in zip(losses, values):
                    window[key] += float(value.detach())
                if step.measure_gap:
                    window["reading_gap"] += float(output.reading_gap)
                    window["gaps"] += 1
                window["rows"] += len(batch) * world
                window["micro"] += 1
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                progress["step"] += 1
                progress["train_seconds"] = seconds_before + time.perf_counter() - started
                bar.update(1)
                late, stop, due = _anywhere(
                    accelerator,
                    config.max_minutes is not None and progress["train_seconds"] > 60 * config.max_minutes,
                    stops.signum is not None,
                    time.perf_counter() - saved_at > 60 * config.save_every_minutes,
                )
                finished = progress["step"] >= total_steps or late
                if float_memory and (finished or not schedule.float_memory(progress["step"])):
                    if config.keep_float_memory_state and not schedule.float_memory(progress["step"]):
                        save_state(out / FLOAT_MEMORY_STATE)
                    model.fit_codebook(train_documents[: config.codebook_fit_documents])
                    float_memory = False
                if progress["step"] % config.log_every == 0 or progress["step"] == total_steps:
                    rate = window["rows"] / (time.perf_counter() - window["time"])
                    alive = model.codec.fraction_alive()
                    record = {k: window[k] / window["micro"] for k in losses}
                    if window["gaps"]:
                        record["reading_gap"] = window["reading_gap"] / window["gaps"]
                    log.write(
                        kind="train",
                        step=progress["step"],
                        epoch=progress["epoch"],
                        codes_alive=alive,
                        rows_per_second=rate,
                        seconds=progress["train_seconds"],
                        lr=scheduler.get_last_lr()[0],
                        **record,
                    )
                    gap = {"gap": f"{record['reading_gap']:.3f}"} if "reading_gap" in record else {}
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        vq=f"{record['vq']:.4f}",
                        codes=f"{alive:.0%}",
                        **gap,
                        ex_s=f"{rate:.1f}",
                    )
                    window = empty_window()
                if finished:
                    break
                if stop:
                    save_last()
                    raise TrainingInterrupted(
                        f"interrupted by {signal.Signals(stops.signum).name} at step {progress['step']} of "
                        f"{total_steps}: the run is saved in {last}; run the same command again to continue",
                        stops.signum,
                    )
                if progress["step"] % config.eval_every == 0:
                    validate_and_save()
                elif due:
                    save_last()
            if not finished:
                progress["epoch"] += 1
                progress["batch"] = 0
    bar.close()
    metrics = validate_and_save()
    accelerator.end_training()
    return metrics

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
from mbc.training.naming import fit_placement, named_tokens
from mbc.training.objectives import StepObjective
from mbc.training.run import RunFolder, StopRequests, refuse_other_settings
from mbc.training.schedule import ProbeTokens, Schedule
from mbc.training.state import has_training_state, load_training_state, saved_progress

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
    naming_steps: Annotated[int, Field(ge=0)] = (
        0  # > 0 (codebook="vocabulary"): the first N steps also train slot k to name the k-th answer token (naming.py)
    )
    naming_only_steps: Annotated[int, Field(ge=0)] = (
        0  # > 0 (codebook="vocabulary"): the first N steps train naming alone, no LLM pass (schedule.py)
    )
    naming_weight: Annotated[float, Field(ge=0)] = 1.0
    naming_before: Annotated[int, Field(ge=0)] = 2  # the targets: each answer's tokens and this many ahead of it
    naming_fill: bool = False  # slots beyond a document's answer tokens name the tokens nearest to them (naming.py)
    # The naming logits are the vocabulary stage's scores (a cosine, or minus a mean squared
    # difference) over this temperature.
    naming_temperature: Annotated[float, Field(gt=0)] = 0.05
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
    # update of the cpu preset's 92M trainable parameters: 46 ms instead of 199 (bench/optimizer.py).
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
    "codebook",
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
        _refuse_other_run(folder, saved and _without_codebook(saved), _without_codebook(identity))
        checkpoint.load_state(model, folder, leave_out=("quantizer.",))
        return load_training_state(folder, optimizer, scheduler, groups=len(optimizer.param_groups))
    except MBCError as error:
        raise MBCError(f"cannot start from {folder}: {error}") from error


def _refuse_other_run(folder: Path, saved: dict | None, current: dict) -> None:
    if saved is None:  # saved before runs recorded what they were
        return
    flat = [{**i["model"], **i["train"], "training rows": i["data"][:12]} for i in (saved, current)]
    refuse_other_settings(folder, "a run", *flat, remedy=None)


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


class LossWindow:
    """What is summed between two log lines: each loss, the measured reading gaps, rows and micro-steps."""

    LOSSES = ("loss", "qa", "vq", "perplexity", "probe", "naming")

    def __init__(self):
        self.sums = dict.fromkeys(self.LOSSES, 0.0)
        self.gap, self.gaps, self.rows, self.micro = 0.0, 0, 0, 0
        self.started = time.perf_counter()

    def add(self, output, measured_gap: bool, rows: int) -> None:
        values = (output.loss, output.qa_loss, output.vq_loss, output.perplexity, output.probe_loss, output.naming_loss)
        for key, value in zip(self.LOSSES, values):
            self.sums[key] += float(value.detach())
        if measured_gap:
            self.gap += float(output.reading_gap)
            self.gaps += 1
        self.rows += rows
        self.micro += 1

    def record(self) -> dict:
        """Each loss's mean over the window's micro-steps, and the mean reading gap where one was measured."""
        record = {key: total / self.micro for key, total in self.sums.items()}
        if self.gaps:
            record["reading_gap"] = self.gap / self.gaps
        return record

    def rows_per_second(self) -> float:
        return self.rows / (time.perf_counter() - self.started)


def train(
    model_config: MBCConfig,
    config: TrainConfig,
    train_rows: list[QAExample],
    validation_rows: list[QAExample],
    frozen_store: FrozenStore | None = None,
    start_from: Path | None = None,
    trained_on: str | None = None,
    init_from: Path | None = None,
) -> dict:
    """Train, validate and checkpoint into ``config.output_dir``; returns the final validation metrics.
    ``frozen_store``: frozen work kept by an earlier training on the same backbones, to reuse (activations.py).
    ``start_from`` (MAC): a MBC run's float-memory state (keep_float_memory_state) to begin at when
    this run has no state of its own to resume. ``trained_on``: a line saying what the rows are, kept
    in every checkpoint for its users (``describe_training``). ``init_from``: a checkpoint whose trained
    weights this run starts from at step 0 (the same shapes; its fitted keys, prefix code and salience
    are kept): a trained adapter taught other training settings, e.g. reading its top 2 documents."""
    if config.return_freed_memory:
        keep_large_allocations_on_mmap()
    if len(train_rows) < config.batch_size:
        raise MBCError(f"{len(train_rows)} training rows is fewer than one batch of {config.batch_size}")
    if (config.naming_steps or config.naming_only_steps) and model_config.codebook != "vocabulary":
        raise MBCError("naming_steps train slots to name tokens: they need --set codebook=vocabulary")
    warm_starts = ("probe_steps", "float_memory_steps", "teach_reading_steps", "probe_weight")
    if model_config.code_reading == "input" and any(getattr(config, name) for name in warm_starts):
        raise MBCError(
            "code_reading 'input' has no modulation for the prefix warm starts to train: set "
            + ", ".join(f"{name}=0" for name in warm_starts if getattr(config, name))
            + " (--train-set)"
        )
    accelerator = _accelerator(model_config, config)
    set_seed(config.seed)
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        writable_folder(out)
        (out / "run_config.json").write_text(
            json.dumps({"model": model_config.to_dict(), "train": asdict(config)}, indent=2)
        )
    model = MBCModel.build(model_config)
    model.trained_on = trained_on
    run = _Run(model, config, accelerator, train_rows, validation_rows)
    run.begin(start_from, frozen_store, init_from)
    with StopRequests() as stops:
        while not run.finished:
            for batch in run.epoch_batches():
                if run.micro_step(batch) and run.after_update(stops):
                    break
            run.next_epoch()
    return run.end()


class _Run:
    """One training run as it goes: the model, its optimizer and schedule, its progress (step,
    epoch, batch within the epoch, best scores, training time), its folder and its log. ``train``
    drives it batch by batch."""

    def __init__(self, model: MBCModel, config: TrainConfig, accelerator, train_rows, validation_rows):
        self.model, self.config, self.accelerator = model, config, accelerator
        self.train_rows, self.validation_rows = train_rows, validation_rows
        self.out = Path(config.output_dir)
        self.main, self.world = accelerator.is_main_process, accelerator.num_processes
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, config)
        self.batches_per_epoch = len(_batches(train_rows, config.batch_size, config.seed, 0)) // self.world
        self.total_steps = config.max_steps or max(
            1, config.epochs * self.batches_per_epoch // config.grad_accumulation
        )
        self.schedule = Schedule(config, self.total_steps, model.config.quantize)
        self.scheduler = get_scheduler(
            SCHEDULES[config.lr_schedule],
            self.optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.train_documents = list(dict.fromkeys(row.document for row in train_rows))  # distinct, in order
        self.progress = {
            "step": 0,
            "epoch": 0,
            "batch": 0,
            "best": {"em": -1.0, "f1": -1.0, "loss": float("inf")},
            "train_seconds": 0.0,
        }

    def begin(self, start_from: Path | None, frozen_store: FrozenStore | None, init_from: Path | None = None) -> None:
        """Resume the run saved in ``last/`` (or start a MAC run from ``start_from``, or this one from
        ``init_from``'s weights), then get ready to step."""
        config, model, last = self.config, self.model, self.out / "last"
        identity = run_identity(model.config, config, self.train_rows)
        if config.resume and has_training_state(last):
            try:
                _refuse_other_run(last, saved_progress(last).get("identity"), identity)
                model.load_trainable_state(last)
                self.progress = load_training_state(last, self.optimizer, self.scheduler)
            except MBCError as error:
                raise MBCError(
                    f"cannot resume from {last}: {error}. Train into a new --output folder, "
                    "or pass --train-set resume=false to start over"
                ) from error
            self.accelerator.print(f"resumed from {last} at step {self.progress['step']}")
        elif start_from is not None:
            self.progress = _start_from_float_memory(Path(start_from), model, self.optimizer, self.scheduler, identity)
            self.accelerator.print(
                f"started from the float-memory state in {start_from} at step {self.progress['step']}"
            )
        elif init_from is not None:
            trained_on = model.trained_on
            try:
                model.load_trainable_state(init_from)
            except MBCError as error:
                raise MBCError(f"cannot start from the weights in {init_from}: {error}") from error
            model.trained_on = trained_on  # what this run reads, not what the weights read before
            self.accelerator.print(f"started from the weights in {init_from}")
        self.progress["identity"] = identity
        if model.retrieval_keys is not None and not bool(model.retrieval_keys.fitted):
            model.retrieval_keys.fit(
                self.train_documents
            )  # every process fits the same centroids: same documents, same seed
        if model.prefix_code is not None and not model.prefix_code.fitted:
            model.fit_code(self.train_documents)
        frozen = FrozenActivations(model, frozen_store) if config.cache_frozen_activations else None
        naming = {}
        if config.naming_steps or config.naming_only_steps:
            naming = named_tokens(
                model.llm.tokenizer,
                self.train_rows,
                model.config.num_slots,
                config.naming_before,
                model.config.max_document_tokens,
                config.naming_fill,
            )
        ids = {text: named[0] for text, named in naming.items()}
        places = {text: named[1] for text, named in naming.items()}
        fit = not self.progress["step"] and init_from is None  # a trained salience is kept as it is
        if places and model.pointer is not None and model.pointer.salience is not None and fit:
            fit_placement(model.pointer, (frozen or model).pointer_states, places)
        objective = StepObjective(model, frozen, ids, places)
        self.objective, self.optimizer = self.accelerator.prepare(objective, self.optimizer)
        self.log = MetricsLog(self.out / "metrics.jsonl", self.accelerator)
        self.saves = RunFolder(
            last,
            model,
            self.optimizer,
            self.scheduler,
            lambda: self.progress,
            config.save_every_minutes,
            self.main,
            self.accelerator.wait_for_everyone,
        )
        step = self.progress["step"]
        self.bar = tqdm(total=self.total_steps, initial=step, disable=not self.main, desc="train", dynamic_ncols=True)
        # True until the codebook is fitted to the encoder's vectors as they are then: when the
        # schedule's float-memory steps are done, or before saving a run that stops earlier.
        self.float_memory = self.schedule.float_memory(step)
        self.objective.train()
        self.started, self.seconds_before = time.perf_counter(), self.progress["train_seconds"]
        self.window = LossWindow()
        self.finished = step >= self.total_steps
        if self.finished:
            self.accelerator.print(
                f"{last} already holds all {self.total_steps} steps of this run: validating it again"
            )

    def epoch_batches(self) -> list[list[QAExample]]:
        """This process's batches of the current epoch, from where the run stands in it."""
        progress = self.progress
        epoch = _batches(self.train_rows, self.config.batch_size, self.config.seed, progress["epoch"])
        epoch = epoch[: self.batches_per_epoch * self.world]
        return epoch[self.accelerator.process_index :: self.world][progress["batch"] :]

    def micro_step(self, batch: list[QAExample]) -> bool:
        """Forward and backward one batch (the optimizer steps once every ``grad_accumulation``); True
        when that made an optimizer step."""
        documents = list(dict.fromkeys(row.document for row in batch))
        own = [documents.index(row.document) for row in batch]
        with self.accelerator.accumulate(self.objective):
            step = self.schedule.at(self.progress["step"], len(documents), self.float_memory)
            output = self.objective(documents, [r.question for r in batch], [r.answers[0] for r in batch], own, step)
            self.accelerator.backward(output.loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.progress["batch"] += 1
        self.window.add(output, step.measure_gap, len(batch) * self.world)
        return self.accelerator.sync_gradients

    def after_update(self, stops: StopRequests) -> bool:
        """Count the optimizer step; fit the codebook, log, validate, save or stop where due. True
        when the run is finished."""
        config, progress = self.config, self.progress
        self.scheduler.step()
        progress["step"] += 1
        progress["train_seconds"] = self.seconds_before + time.perf_counter() - self.started
        self.bar.update(1)
        late, stop, due = _anywhere(
            self.accelerator,
            config.max_minutes is not None and progress["train_seconds"] > 60 * config.max_minutes,
            stops.signum is not None,
            self.saves.due(),
        )
        self.finished = progress["step"] >= self.total_steps or late
        if self.float_memory and (self.finished or not self.schedule.float_memory(progress["step"])):
            self.end_float_memory()
        if progress["step"] % config.log_every == 0 or progress["step"] == self.total_steps:
            self.log_window()
        if self.finished:
            return True
        if stop:
            self.saves.save()
            raise stops.interrupted(
                f"step {progress['step']} of {self.total_steps}", f"the run is saved in {self.saves.folder}"
            )
        if progress["step"] % config.eval_every == 0:
            self.validate_and_save()
        elif due:
            self.saves.save()
        return False

    def next_epoch(self) -> None:
        if not self.finished:
            self.progress["epoch"] += 1
            self.progress["batch"] = 0

    def end_float_memory(self) -> None:
        """The warm start's end: keep its state where asked, then fit the codebook to the vectors as they are."""
        if self.config.keep_float_memory_state and not self.schedule.float_memory(self.progress["step"]):
            self.saves.write(self.out / FLOAT_MEMORY_STATE)
        self.model.fit_codebook(self.train_documents[: self.config.codebook_fit_documents])
        self.float_memory = False

    def log_window(self) -> None:
        window, progress = self.window, self.progress
        rate = window.rows_per_second()
        alive = self.model.codec.fraction_alive()
        record = window.record()
        self.log.write(
            kind="train",
            step=progress["step"],
            epoch=progress["epoch"],
            codes_alive=alive,
            rows_per_second=rate,
            seconds=progress["train_seconds"],
            lr=self.scheduler.get_last_lr()[0],
            **record,
        )
        gap = {"gap": f"{record['reading_gap']:.3f}"} if "reading_gap" in record else {}
        self.bar.set_postfix(
            loss=f"{record['loss']:.3f}", vq=f"{record['vq']:.4f}", codes=f"{alive:.0%}", **gap, ex_s=f"{rate:.1f}"
        )
        self.window = LossWindow()

    def validate_and_save(self) -> dict:
        """Validation metrics (main process; none during the warm start, when a bank stored through the
        unfitted codebook means nothing), the best checkpoints they beat, and ``last/``."""
        config, progress, metrics = self.config, self.progress, {}
        rows = self.validation_rows if config.eval_questions is None else self.validation_rows[: config.eval_questions]
        if self.main and rows:
            metrics = (
                validation_metrics(self.model, rows, self.train_documents, config) if not self.float_memory else {}
            )
            self.log.write(kind="validation", step=progress["step"], **metrics)
            for key, folder in BEST.items():
                better = metrics and (
                    metrics[key] < progress["best"][key] if key == "loss" else metrics[key] > progress["best"][key]
                )
                if better:
                    progress["best"][key] = metrics[key]
                    if config.save_best:
                        self.model.save_pretrained(self.out / folder)
            rounded = {k: round(v, 3) for k, v in metrics.items()}
            self.accelerator.print(f"step {progress['step']}: validation {json.dumps(rounded)}")
        self.saves.save()
        return metrics

    def end(self) -> dict:
        self.bar.close()
        metrics = self.validate_and_save()
        self.accelerator.end_training()
        return metrics


def _accelerator(model_config: MBCConfig, config: TrainConfig) -> Accelerator:
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
    return accelerator

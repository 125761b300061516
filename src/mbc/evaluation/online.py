"""The paper's headline experiment: stream test documents into a bank, answer every question about
them, and compare with the baselines on the same documents and questions.

Methods (``METHODS`` below: each scored with EM, F1 and lenient EM, with its memory per document
and its time; ``--method`` takes the key in brackets):
- ``mbc`` [mbc]: the trained MBC adapter, answering from a durable codebook bank (code-count reading);
- ``mbc, unrelated bank`` [mbc-unrelated]: the same adapter answering from a bank of as many
  documents about something else; what it scores comes from the adapter, not from the stored documents;
- ``mac`` and ``mac, unrelated bank`` [mac, mac-unrelated]: a MAC checkpoint (float bank, windowed
  reading), when one is given, and its control as for MBC;
- ``base, raw question`` and ``base, 3 worked examples`` [base-raw, base-examples]: the base LLM
  with no adaptation;
- ``base, gold document`` (an upper bound) and ``base, BM25 top-k`` [base-gold, base-bm25]:
  documents in the prompt, after the same worked examples.
- ``mbc + BM25 top-k`` [mbc-bm25] (when named): BM25's documents in the prompt as for ``base, BM25
  top-k``, and the adapter's prefix read from the ``mbc`` bank: whether the memory adds to the text.
- ``tokens`` and ``tokens, unrelated bank`` [tokens, tokens-unrelated] (when a token memory is
  given, token_memory.py): each document kept as K of its own token ids, the base LLM reading the
  top-1 document's; and the same with a bank of unrelated documents.
- ``QA-tuned, closed book``, ``uniform fine-tuning``, ``salient spans (rules)`` and ``camels
  fine-tuning`` [qa-tuned, uniform, salient, camels] (when a QA-tuned LLM is given, finetuning.py and
  camels.py): nothing stored, every document of the stream into the LLM's weights.

Retention: the questions about the first ``retention_every`` documents are answered again after
every further ``retention_every`` documents streamed; F1 relative to the first answers, in percent.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Callable

import psutil
import torch
from tqdm.auto import tqdm

from mbc.bank import BankLayout, MemoryBank
from mbc.bank.postgres import free_bank_url, is_postgres_url
from mbc.data import QAExample, documents
from mbc.data.generated import answer_kinds
from mbc.errors import MBCError
from mbc.evaluation.baselines import bm25_retriever, fitted_context_prompt, llm_window
from mbc.evaluation.metrics import retention_percent, score, score_by_group
from mbc.evaluation.report import write_predictions
from mbc.evaluation.validation import chunks, retrieval_recall
from mbc.finetuning import FinetuneConfig
from mbc.memory.ingest import ingest
from mbc.memory.protocol import Memory
from mbc.memory.readers import RetrievalReader, answer_from_bank, reader_for
from mbc.model import MBCModel
from mbc.network.decoding import DecodingConfig, Strategy
from mbc.network.frozen_llm import FrozenLLM
from mbc.paths import writable_folder
from mbc.prompts import FEW_SHOT_TEMPLATE, answer_prompts
from mbc.settings import Field, settings


@settings
class EvalConfig:
    retention_every: Annotated[int, Field(ge=1)] = 200  # documents per retention step
    # Questions answered together. Short prompts are bound by decoding, where a batch of 64 takes
    # ~60% of the time per question of 16 (bench: the base LLM, 150 -> 90 ms); prompts that carry a
    # document are bound by their prefill and stay at context_batch_size (64 was slower there).
    batch_size: Annotated[int, Field(ge=1)] = 64
    context_batch_size: Annotated[int, Field(ge=1)] = 16
    decoding: Strategy = "greedy"
    bm25_top_k: Annotated[int, Field(ge=1)] = 1
    max_context_tokens: Annotated[int, Field(ge=64)] | None = (
        None  # the gold-document and BM25 prompts are cut to this; None: the LLM's window
    )
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    # online fine-tuning (finetuning.py's FinetuneConfig): chosen on the validation split
    finetune_learning_rate: float = FinetuneConfig.learning_rate
    finetune_steps: int = FinetuneConfig.steps_per_document

    def __post_init__(self):
        self.methods = [method_named(m) for m in self.methods]
        if not self.methods:
            raise MBCError(f"choose at least one method; known: {', '.join(m.key for m in METHODS)}")
        if "mbc + BM25 top-k" in self.methods and "mbc" not in self.methods:
            raise MBCError("the method 'mbc + BM25 top-k' reads the bank the method 'mbc' streams: choose both")
        self.finetune()  # its settings are checked now, before any model loads

    def finetune(self):
        return FinetuneConfig(self.finetune_learning_rate, self.finetune_steps)


BASE_LLM_CARRIERS = ("mbc", "mac", "tokens")  # the models whose frozen LLM the base methods read


def runnable_methods(methods: list[str], given: set[str]) -> list[str]:
    """The chosen methods that can run with the models ``given`` ("mbc", "mac", "tokens", "qa"), in
    table order; one line saying what is missing when none can, or when no model is given at all."""
    carries_base = any(name in given for name in BASE_LLM_CARRIERS)
    runnable = [
        m.name for m in METHODS if m.name in methods and (m.needs in given or (m.needs is None and carries_base))
    ]
    if not runnable or not given:
        raise MBCError(
            f"the methods {methods} need a model that was not given: 'mbc' needs an MBC checkpoint, 'mac' a MAC "
            "checkpoint (--mac), 'tokens' a token memory (--tokens), the fine-tuning methods a QA-tuned LLM "
            "(--qa-tuned, from `mbc train-qa`), 'camels' also a weighting model (--camels, from `mbc train-camels`); "
            "the base LLM's methods run with an MBC, MAC or token memory model"
        )
    return runnable


@dataclass
class MethodResult:
    predictions: list[str]
    bytes_per_document: float
    answer_ms_per_question: float
    adapt_ms_per_document: float | None = None  # methods that stream documents into a bank or the weights
    adapt_peak_mb: float | None = None  # ... and the resident memory their adaptation added at its peak


def peak_memory_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 30) if sys.platform == "darwin" else peak / (1 << 20)


class _Timer:
    """Seconds spent inside its ``with`` blocks; with ``memory``, also the peak resident memory the
    blocks added over what the process held when the first one began (sampled every 5 ms: torch's
    CPU tensors are not seen by Python's own allocator tracing)."""

    def __init__(self, memory: bool = False):
        self.seconds, self.memory, self.base, self.peak = 0.0, memory, None, 0

    def __enter__(self):
        if self.memory:
            rss = psutil.Process().memory_info().rss
            self.base = rss if self.base is None else self.base
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self.start = time.perf_counter()

    def _sample(self):
        process = psutil.Process()
        while True:
            self.peak = max(self.peak, process.memory_info().rss)
            if self._stop.wait(0.005):
                return

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self.start
        if self.memory:
            self._stop.set()
            self._sampler.join()

    @property
    def added_mb(self) -> float | None:
        return None if self.base is None else max(0, self.peak - self.base) / (1 << 20)


def _answer_rows(answer, rows: list[QAExample], batch_size: int, timer: _Timer, desc: str) -> list[str]:
    predictions = []
    for chunk in tqdm(list(chunks(rows, batch_size)), desc=desc, unit="batch", leave=False):
        with timer:
            predictions += answer(chunk)
    return predictions


def fresh_bank(model: Memory, folder: str | Path, name: str) -> MemoryBank:
    """A new, empty bank in ``folder``: ``name.db``, or ``name-2.db`` and so on where that is taken
    (an earlier evaluation's bank, or anyone's file: nothing is ever deleted). ``folder`` may be a
    ``postgresql://`` URL instead: the bank is then a new schema on that server."""
    if is_postgres_url(folder):
        return MemoryBank.open(free_bank_url(folder, name), BankLayout.of(model))
    folder = Path(folder)
    for number in range(1, 10_000):
        path = folder / (f"{name}.db" if number == 1 else f"{name}-{number}.db")
        if not any(Path(f"{path}{suffix}").exists() for suffix in ("", "-wal", "-shm", "-journal")):
            return MemoryBank.open(path, BankLayout.of(model))
    raise MBCError(f"{folder} holds 10,000 banks named {name}*.db: clear it or give another --output folder")


def _stream(stream, rows, retention_rows, config: EvalConfig, name: str, adapt_step, ask, point):
    """``adapt_step(documents)`` on the stream in steps of ``retention_every`` (timed, with the
    memory it adds), ``point()`` after each step a curve point; after each step but the last, the
    retention questions answered again by ``ask``, then every question. Returns the predictions,
    the curve and the adaptation's and the answers' timers."""
    adapt, answer_timer = _Timer(memory=True), _Timer()
    curve = []
    for start in tqdm(range(0, len(stream), config.retention_every), desc=f"{name}: stream", unit="step"):
        with adapt:
            adapt_step(stream[start : start + config.retention_every])
        curve.append(point())
        if start + config.retention_every < len(stream):
            answers = _answer_rows(ask, retention_rows, config.batch_size, _Timer(), f"{name}: retention")
            curve[-1]["retention_f1"] = score(answers, [list(r.answers) for r in retention_rows])["f1"]
    predictions = _answer_rows(ask, rows, config.batch_size, answer_timer, f"{name}: answer")
    if curve:
        first = {id(r) for r in retention_rows}
        kept = [p for p, r in zip(predictions, rows) if id(r) in first]
        curve[-1]["retention_f1"] = score(kept, [list(r.answers) for r in retention_rows])["f1"]
    return predictions, curve, adapt, answer_timer


def _stream_into_bank(
    model: Memory,
    banks: Path,
    stream: list[str],
    rows: list[QAExample],
    retention_rows: list[QAExample],
    config: EvalConfig,
    decoding: DecodingConfig,
    name: str,
):
    """Stream documents into a fresh bank (``_stream``). Returns the result, the curve, the bank's
    sizes and the address it was opened at."""
    bank = fresh_bank(model, banks, name)
    reader = reader_for(model, bank)
    stream_ids = []

    def store(documents: list[str]) -> None:
        stream_ids.extend(ingest(model, bank, documents, batch_size=config.batch_size).ids)

    def point() -> dict:
        sizes = bank.sizes()
        return {k: sizes[k] for k in ("documents", "stored_bytes", "mac_equivalent_bytes", "file_bytes")}

    ask = lambda chunk: answer_from_bank(model, reader, [r.question for r in chunk], decoding)  # noqa: E731
    predictions, curve, adapt, answer_timer = _stream(stream, rows, retention_rows, config, name, store, ask, point)
    sizes = {**bank.sizes(), "path": bank.address}
    if isinstance(reader, RetrievalReader):
        sizes["retrieval_recall_percent"] = retrieval_recall(
            reader, rows, dict(zip(stream, stream_ids)), config.batch_size
        )
    bank.close()
    result = MethodResult(
        predictions,
        sizes["stored_bytes"] / max(sizes["documents"], 1),
        1000 * answer_timer.seconds / max(len(rows), 1),
        1000 * adapt.seconds / max(len(stream), 1),
        adapt.added_mb,
    )
    return result, curve, sizes, bank.opened_from


def _stream_into_weights(given, stream, rows, retention_rows, config, decoding, name: str, spans: str | None):
    """Online fine-tuning (finetuning.py) of the QA-tuned LLM ``given["qa"]`` on the stream
    (``_stream``); ``spans`` None: no update at all, and no stream (the starting point); "camels":
    each token weighted by the weighting model ``given["camels"]``."""
    from mbc.finetuning import ClosedBookLLM, OnlineFinetuning

    model = ClosedBookLLM.load_qa_tuned(given["qa"])
    weigher = None
    if spans == "camels":
        from mbc.camels import WeightingModel

        weigher = WeightingModel.load(given["camels"], model, given["qa"])
    tuner = OnlineFinetuning(model, replace(config.finetune(), spans=spans), weigher) if spans else None
    stream = stream if tuner else []
    done = [0]

    def learn(documents: list[str]) -> None:
        for document in documents:
            tuner.adapt(document)
        done[0] += len(documents)

    ask = lambda chunk: model.answer([r.question for r in chunk], decoding)  # noqa: E731
    point = lambda: {"documents": done[0]}  # noqa: E731
    predictions, curve, adapt, answer_timer = _stream(stream, rows, retention_rows, config, name, learn, ask, point)
    answer_ms = 1000 * answer_timer.seconds / max(len(rows), 1)
    if tuner is None:
        return MethodResult(predictions, 0.0, answer_ms), curve
    adapt_ms = 1000 * adapt.seconds / max(len(stream), 1)
    return MethodResult(predictions, 0.0, answer_ms, adapt_ms, adapt.added_mb), curve


def _unrelated(model, banks: Path, unrelated_documents: list[str], rows, config, decoding, name: str) -> MethodResult:
    with fresh_bank(model, banks, name) as bank:
        ingest(model, bank, unrelated_documents, batch_size=config.batch_size, progress=True)
        reader, timer = reader_for(model, bank), _Timer()
        predictions = _answer_rows(
            lambda c: answer_from_bank(model, reader, [r.question for r in c], decoding),
            rows,
            config.batch_size,
            timer,
            f"{name}: answer",
        )
        per_document = bank.sizes()["stored_bytes"] / max(len(bank), 1)
    return MethodResult(predictions, per_document, 1000 * timer.seconds / max(len(rows), 1))


class _PromptAnswers:
    """The base LLM's greedy answer to each prompt text, generated once: where BM25 puts a question's
    own document into the prompt, its prompt is the gold-document prompt, token for token."""

    def __init__(self, llm: FrozenLLM, decoding: DecodingConfig):
        self.llm, self.decoding = llm, decoding
        self.answers: dict[str, tuple[str, float]] = {}  # prompt -> (answer, ms it took)

    def __call__(
        self, prompts: list[str], name: str, batch_size: int, groups: list[str] | None = None
    ) -> tuple[list[str], float]:
        """The answers to ``prompts`` and the mean ms per prompt they took (when first generated).
        Prompts of one group (the same document in front of different questions) are answered in
        batches of their own, so that ``FrozenLLM.generate`` runs their common start once."""
        new = list(dict.fromkeys(p for p in prompts if p not in self.answers))
        group_of = dict(zip(prompts, groups)) if groups else {}
        by_group: dict[str, list[str]] = {}
        for prompt in new:
            by_group.setdefault(group_of.get(prompt, ""), []).append(prompt)
        batches = [batch for members in by_group.values() for batch in chunks(members, batch_size)]
        for chunk in tqdm(batches, desc=name, unit="batch", leave=False):
            start = time.perf_counter()
            answers = answer_prompts(self.llm, chunk, self.decoding)
            ms = 1000 * (time.perf_counter() - start) / len(chunk)
            self.answers.update((prompt, (answer, ms)) for prompt, answer in zip(chunk, answers))
        answered = [self.answers[p] for p in prompts]
        return [answer for answer, _ in answered], sum(ms for _, ms in answered) / max(len(prompts), 1)


def _base(prompt_answers: _PromptAnswers, rows, prompt, name: str, batch_size: int) -> MethodResult:
    predictions, ms = prompt_answers([prompt(r) for r in rows], name, batch_size)
    return MethodResult(predictions, 0.0, ms)


def _fitted_prompts(llm: FrozenLLM, rows, contexts, config, decoding: DecodingConfig) -> list[tuple[str, bool]]:
    """Row i's context prompt with ``contexts[i]``, cut to fit the LLM's window (or
    ``max_context_tokens``) with room for the answer; and whether it was cut."""
    budget = min(config.max_context_tokens or llm_window(llm), llm_window(llm)) - decoding.max_new_tokens
    return [fitted_context_prompt(llm, c, r.question, budget) for r, c in zip(rows, contexts)]


def _with_context(prompt_answers: _PromptAnswers, rows, contexts, fitted, config, name: str, text_bytes: float):
    """The base LLM reading row i's ``fitted`` prompt (``_fitted_prompts``, with ``contexts[i]``);
    and how many were cut."""
    prompts = [prompt for prompt, _ in fitted]
    predictions, ms = prompt_answers(prompts, name, config.context_batch_size, groups=contexts)
    return MethodResult(predictions, text_bytes, ms), sum(cut for _, cut in fitted)


def _memory_and_text(model: MBCModel, bank_address: str, rows, fitted, config, decoding, name, text_bytes):
    """The adapter's prefix, read from its bank, on row i's ``fitted`` prompt (the gold-document
    prompt's layout, with retrieved documents): the memory on top of retrieval."""
    if model.reads_input:
        raise MBCError(
            "the memory on top of BM25 reads the adapter's prefix; a model with code_reading 'input' has none"
        )
    prompts = [prompt for prompt, _ in fitted]
    predictions, timer = [], _Timer()
    with MemoryBank.open_existing(bank_address) as bank:
        reader, per_document = reader_for(model, bank), bank.sizes()["stored_bytes"] / max(len(bank), 1)
        for chunk in tqdm(list(chunks(list(zip(rows, prompts)), config.context_batch_size)), desc=name, leave=False):
            with timer:
                prefix = model.prefix(reader.modulation([row.question for row, _ in chunk]))
                ids = [model.llm.tokenizer(p)["input_ids"] for _, p in chunk]
                predictions += model.llm.generate(ids, prefix, decoding)
    return MethodResult(predictions, per_document + text_bytes, 1000 * timer.seconds / max(len(rows), 1))


# ---- the methods: what each needs, how it runs ---------------------------------------------------
class EvalRun:
    """What every method of one evaluation reads, and where each leaves its result (by its name)."""

    def __init__(self, rows, stream, unrelated, output: Path, banks, config, decoding, given: dict, base, text_bytes):
        self.rows, self.stream, self.unrelated, self.output, self.banks = rows, stream, unrelated, output, banks
        self.config, self.decoding, self.given, self.base, self.text_bytes = config, decoding, given, base, text_bytes
        self.retention_rows = [r for r in rows if r.document in set(stream[: config.retention_every])]
        self.prompt_answers = _PromptAnswers(base, decoding)
        self.results: dict[str, MethodResult] = {}
        self.curves, self.bank_sizes, self.cut, self.bank_addresses = {}, {}, {}, {}
        self.bm25_recall = None  # questions whose own document BM25 retrieved, in percent
        self._bm25 = None

    def bm25(self) -> tuple[list[str], list[tuple[str, bool]]]:
        """Each row's BM25 context and its fitted prompt, retrieved once for every method that reads them."""
        if self._bm25 is None:
            retrieve = bm25_retriever(self.stream, self.config.bm25_top_k)
            retrieved = {id(r): retrieve(r.question) for r in self.rows}
            contexts = ["\n\n".join(retrieved[id(r)]) for r in self.rows]
            self._bm25 = contexts, _fitted_prompts(self.base, self.rows, contexts, self.config, self.decoding)
            self.bm25_recall = 100 * sum(r.document in retrieved[id(r)] for r in self.rows) / max(len(self.rows), 1)
        return self._bm25

    @property
    def bm25_label(self) -> str:
        return f"BM25 top-{self.config.bm25_top_k}"


def _streamed(adapter: str):
    def run(ev: EvalRun) -> None:
        result, curve, sizes, address = _stream_into_bank(
            ev.given[adapter],
            ev.banks,
            ev.stream,
            ev.rows,
            ev.retention_rows,
            ev.config,
            ev.decoding,
            adapter,
        )
        ev.results[adapter], ev.curves[adapter], ev.bank_sizes[adapter] = result, curve, sizes
        ev.bank_addresses[adapter] = address

    return run


def _with_unrelated_bank(adapter: str):
    def run(ev: EvalRun) -> None:
        bank_name = "unrelated" if adapter == "mbc" else f"{adapter}-unrelated"
        unrelated = ev.unrelated[: len(ev.stream)]
        ev.results[f"{adapter}, unrelated bank"] = _unrelated(
            ev.given[adapter], ev.banks, unrelated, ev.rows, ev.config, ev.decoding, bank_name
        )

    return run


def _finetuned(key: str, spans: str | None):
    def run(ev: EvalRun) -> None:
        name = METHODS_BY_KEY[key].name
        result, curve = _stream_into_weights(
            ev.given, ev.stream, ev.rows, ev.retention_rows, ev.config, ev.decoding, name, spans
        )
        ev.results[name] = result
        if curve:
            ev.curves[name] = curve

    return run


def _raw_question(ev: EvalRun) -> None:
    template = ev.base.prompt_template
    name = "base, raw question"
    ev.results[name] = _base(
        ev.prompt_answers, ev.rows, lambda r: template.format(question=r.question), name, ev.config.batch_size
    )


def _worked_examples(ev: EvalRun) -> None:
    name = "base, 3 worked examples"
    ask = lambda r: FEW_SHOT_TEMPLATE.replace("{question}", r.question)  # noqa: E731
    ev.results[name] = _base(ev.prompt_answers, ev.rows, ask, name, ev.config.batch_size)


def _gold_document(ev: EvalRun) -> None:
    name, own = "base, gold document", [r.document for r in ev.rows]
    gold = _fitted_prompts(ev.base, ev.rows, own, ev.config, ev.decoding)
    ev.results[name], ev.cut[name] = _with_context(
        ev.prompt_answers, ev.rows, own, gold, ev.config, name, ev.text_bytes
    )


def _bm25_documents(ev: EvalRun) -> None:
    name, (contexts, prompts) = f"base, {ev.bm25_label}", ev.bm25()
    ev.results[name], ev.cut[name] = _with_context(
        ev.prompt_answers, ev.rows, contexts, prompts, ev.config, name, ev.text_bytes
    )


def _memory_on_bm25(ev: EvalRun) -> None:
    name, (_, prompts) = f"mbc + {ev.bm25_label}", ev.bm25()
    bank = ev.bank_addresses["mbc"]  # the bank the method 'mbc' streamed (it runs first)
    ev.results[name] = _memory_and_text(
        ev.given["mbc"], bank, ev.rows, prompts, ev.config, ev.decoding, name, ev.text_bytes
    )


@dataclass(frozen=True)
class Method:
    key: str  # what `mbc eval --method` takes
    name: str  # its row in the tables, predictions.csv and summary.json ("top-k" there: the k used)
    needs: str | None  # the model it runs ("mbc", "mac" or "tokens"); None: the base LLM of whichever is given
    run: Callable[[EvalRun], None]
    default: bool = True  # run when no method is named


METHODS = (  # in table order; a method reading another's bank comes after it
    Method("mbc", "mbc", "mbc", _streamed("mbc")),
    Method("mbc-unrelated", "mbc, unrelated bank", "mbc", _with_unrelated_bank("mbc")),
    Method("mac", "mac", "mac", _streamed("mac")),
    Method("mac-unrelated", "mac, unrelated bank", "mac", _with_unrelated_bank("mac")),
    Method("base-raw", "base, raw question", None, _raw_question),
    Method("base-examples", "base, 3 worked examples", None, _worked_examples),
    Method("base-gold", "base, gold document", None, _gold_document),
    Method("base-bm25", "base, BM25 top-k", None, _bm25_documents),
    # The memory on top of retrieval, as MAC's paper reports MAC + BM25: it costs as much as the gold
    # document's prompts again, so it runs only when named.
    Method("mbc-bm25", "mbc + BM25 top-k", "mbc", _memory_on_bm25, default=False),
    Method("tokens", "tokens", "tokens", _streamed("tokens")),
    Method("tokens-unrelated", "tokens, unrelated bank", "tokens", _with_unrelated_bank("tokens")),
    # Online fine-tuning (finetuning.py), from the QA-tuned LLM `mbc train-qa` made: its starting
    # point unchanged, then every document into its weights by the whole text or by salient spans.
    Method("qa-tuned", "QA-tuned, closed book", "qa", _finetuned("qa-tuned", None)),
    Method("uniform", "uniform fine-tuning", "qa", _finetuned("uniform", "all")),
    Method("salient", "salient spans (rules)", "qa", _finetuned("salient", "salient")),
    # CaMeLS (camels.py): every token, weighted by a model `mbc train-camels` meta-trained for that LLM.
    Method("camels", "camels fine-tuning", "camels", _finetuned("camels", "camels")),
)
METHODS_BY_NAME = {m.name: m for m in METHODS}
METHODS_BY_KEY = {m.key: m for m in METHODS}
ALL_METHODS = tuple(METHODS_BY_NAME)
DEFAULT_METHODS = tuple(m.name for m in METHODS if m.default)


def method_named(text: str) -> str:
    """The method a user named, by its key (``mbc-unrelated``) or its full name (``mbc, unrelated bank``)."""
    for method in METHODS:
        if text.strip() in (method.key, method.name):
            return method.name
    raise MBCError(f"unknown method {text!r}; choose among {', '.join(m.key for m in METHODS)}")


@torch.no_grad()
def run_eval(
    mbc: MBCModel | None,
    rows: list[QAExample],
    unrelated_documents: list[str],
    output: str | Path,
    config: EvalConfig | None = None,
    mac: MBCModel | None = None,
    notes: dict | None = None,
    tokens=None,
    banks: str | Path | None = None,
    qa_tuned: str | Path | None = None,
    camels: str | Path | None = None,
) -> dict:
    """Run every method of ``config.methods`` on ``rows`` (their documents streamed in order) and
    write ``predictions.csv``, ``summary.json`` (with ``notes`` added) and the plots into ``output``;
    returns the summary. ``mbc``, ``mac`` and ``tokens`` (a ``TokenMemory``): the models of those
    methods, which are left out when not given; the base LLM's methods run on whichever is given.
    ``qa_tuned``: the folder of a QA-tuned LLM (`mbc train-qa`), which the fine-tuning methods
    load afresh and change; ``camels``: a CaMeLS weighting model for it (`mbc train-camels`).
    ``banks``: where the methods' new banks go, a folder (default ``output/banks``) or a
    ``postgresql://`` URL (one new bank per method on that server)."""
    from mbc.evaluation.plots import plot_bank_size, plot_retention

    config = config or EvalConfig()
    models = (("mbc", mbc), ("mac", mac), ("tokens", tokens), ("qa", qa_tuned), ("camels", camels))
    given = {name: model for name, model in models if model is not None}
    if "camels" in given and "qa" not in given:
        raise MBCError("CaMeLS fine-tunes the QA-tuned LLM its weighting model was trained on: give it with --qa-tuned")
    methods = runnable_methods(config.methods, set(given))
    if mbc is not None and not mbc.config.quantize:
        raise MBCError("the MBC model given has quantize=false: it is a MAC model (give it as the MAC checkpoint)")
    if mac is not None and mac.config.quantize:
        raise MBCError(
            "the MAC model given has quantize=true: it is an MBC model; a MAC checkpoint is trained with quantize=false"
        )
    if not rows:
        raise MBCError("no questions to evaluate: the split (or --documents) selects none")
    if any(m.endswith("unrelated bank") for m in config.methods) and not unrelated_documents:
        raise MBCError("the unrelated-bank control needs documents from the training split, and it has none")
    output = writable_folder(output)
    if not is_postgres_url(banks):
        banks = writable_folder(banks or output / "banks")
    decoding = DecodingConfig(config.decoding)
    stream = documents(rows)
    text_bytes = sum(len(d.encode("utf-8")) for d in stream) / max(len(stream), 1)
    # the frozen LLM, read without a memory by the base methods
    base = next((model.llm for model in (mbc, mac, tokens) if model is not None), None)
    run = EvalRun(rows, stream, unrelated_documents, output, banks, config, decoding, given, base, text_bytes)
    for name in methods:
        METHODS_BY_NAME[name].run(run)
    results, curves, bank_sizes, cut = run.results, run.curves, run.bank_sizes, run.cut
    bm25_recall = run.bm25_recall

    golds, kinds = [list(r.answers) for r in rows], answer_kinds(rows)
    summary = {
        "questions": len(rows),
        "documents": len(stream),
        "config": asdict(config),
        "methods": {
            name: {
                **score(r.predictions, golds),
                "bytes_per_document": r.bytes_per_document,
                "answer_ms_per_question": r.answer_ms_per_question,
                "adapt_ms_per_document": r.adapt_ms_per_document,
                "adapt_peak_mb": r.adapt_peak_mb,
                **({"by_answer_kind": score_by_group(r.predictions, golds, kinds)} if kinds else {}),
            }
            for name, r in results.items()
        },
        "banks": bank_sizes,
        "retention": {
            name: [
                {
                    **p,
                    "retention_percent": retention_percent(p["retention_f1"], curve[0]["retention_f1"]),
                }
                for p in curve
            ]
            for name, curve in curves.items()
        },
        "bm25_recall_percent": bm25_recall,  # questions whose own document BM25 put into the prompt
        "prompts_cut_to_fit": cut,  # per method: prompts whose documents were cut to the LLM's window
        "peak_memory_gb": peak_memory_gb(),
        **(notes or {}),
    }
    plots = any(len(curve) > 1 for curve in curves.values())  # one step: nothing was asked again
    # fine-tuning methods store nothing: a bank-size plot only where some method grew a bank
    banks_grown = {k: c for k, c in summary["retention"].items() if "stored_bytes" in c[0]} if plots else {}
    summary["files"] = ["predictions.csv", "summary.json"] + (["retention.png"] if plots else [])
    summary["files"] += ["bank_size.png"] if banks_grown else []
    write_predictions(output / "predictions.csv", rows, results)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    if plots:
        plot_retention(summary["retention"], output / "retention.png")
    if banks_grown:
        plot_bank_size(banks_grown, output / "bank_size.png")
    return summary

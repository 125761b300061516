"""Token memory: each document kept as K of its own LLM token ids, read by the base LLM as text.

A memory variant beside MBC's (model.py), for the lever "a codebook the LLM can already read" at
its simplest. The codebook is the base LLM's own token table, so a 16-bit index names a token of
the document and the memory enters input-side, as text, where MBC's code vectors enter as a prefix
the adapter must learn to decode (and never learned to decode into a name or number):

    document --frozen LLM, hidden states entering `layer`--> a score per token --top K, in order--> K token ids (the bank)
    question --retrieval key (network/retrieval.py) + BM25 over the kept tokens (network/lexical.py)-->
    its top-1 document --> the kept tokens as the context of the worked-example prompt
    (evaluation/baselines.py) --> frozen base LLM --> answer

Which tokens a document keeps is learned: a linear scorer reads each token's hidden state beside
its successor's (a causal LLM sees no right context), trained on the training documents to flag the
tokens of an answer to one of their questions, and the ``before`` tokens ahead of each answer (the
words that say what it is). Nothing else trains: the scorer takes seconds, the frozen LLM's hidden
states minutes. A document shorter than K tokens is kept whole, padded with an index past the
vocabulary. Bytes per document: 2 per kept token plus the retrieval key. The kept tokens are also
the lexical half of choosing which document a question reads: a 32-byte key alone finds the own
SQuAD paragraph for ~60% of questions, the key and BM25 over the kept tokens for ~79%.
"""

from __future__ import annotations

import hashlib
import random
import re
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mbc import checkpoint
from mbc.config import MBCConfig
from mbc.errors import MBCError, check_texts
from mbc.memory.packing import packed_size
from mbc.network.codebook import fingerprint
from mbc.network.decoding import DecodingConfig
from mbc.network.frozen_llm import lower_hidden
from mbc.network.lexical import bm25, combined
from mbc.network.lora import lora_disabled
from mbc.training.state import (
    has_training_state,
    load_training_state,
    python_rng_state,
    save_training_state,
    saved_progress,
)

KIND = "token_memory"  # the checkpoint's "kind", which tells it from an MBC checkpoint


def _cpu_preset() -> dict:
    from mbc.training.presets import preset

    return preset("cpu")["model"]


@dataclass
class TokenMemoryConfig:
    keep: int = 48  # tokens kept per document (2 bytes each); chosen on validation (docs/RESULTS.md)
    layer: int = 20  # the scorer reads the LLM's hidden state entering this layer (SmolLM2: of 30)
    max_document_tokens: int = 512  # longer documents are stored as passages of this many LLM tokens
    # Which document a question reads: its retrieval key's score plus this times BM25 over the kept
    # tokens, each standardised over the bank (0: the key alone). Chosen on SQuAD validation (docs/RESULTS.md).
    lexical_weight: float = 0.3
    # True: the base LLM's KV-LoRA was trained to answer from kept tokens (``train_reader``); False:
    # the base LLM reads them unchanged. Either reads them in the same worked-example prompt.
    trained_reader: bool = False
    # The base LLM, tokenizer and retrieval keys: an MBC config (only those parts of it are used)
    base: dict = field(default_factory=_cpu_preset)

    def __post_init__(self):
        if self.keep < 1 or self.layer < 1 or self.max_document_tokens < 16 or self.lexical_weight < 0:
            raise MBCError(
                f"a token memory needs keep >= 1, layer >= 1, max_document_tokens >= 16 and lexical_weight >= 0, "
                f"got {self.keep}, {self.layer}, {self.max_document_tokens} and {self.lexical_weight}"
            )
        if not self.base.get("retrieval_top_k"):
            raise MBCError(
                "a token memory reads its top-1 document by retrieval keys: its base needs retrieval_top_k > 0"
            )

    def to_dict(self) -> dict:
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "TokenMemoryConfig":
        values = {k: v for k, v in values.items() if k != "kind"}
        values.setdefault("lexical_weight", 0.0)  # saved before the setting: read by the key alone, as measured
        try:
            return cls(**values)
        except TypeError as error:
            raise MBCError(f"not a token memory config: {error}") from error


class TokenCodec:
    """Kept token ids <-> bank entries [K, 1] (one "stage"), padded with ``pad`` past the vocabulary."""

    mode = "tokens"

    def __init__(self, vocabulary: int, keep: int):
        self.pad, self.keep = vocabulary, keep
        self.codebook_size = vocabulary + 1  # the pad index too: still 16 bits for SmolLM2's 49,152

    def encode(self, kept: list[list[int]]) -> np.ndarray:
        entries = np.full((len(kept), self.keep, 1), self.pad, dtype=np.uint32)
        for row, ids in enumerate(kept):
            entries[row, : len(ids), 0] = ids
        return entries

    def decode(self, entries: np.ndarray) -> list[list[int]]:
        return [[int(i) for i in entry[:, 0] if i != self.pad] for entry in np.asarray(entries)]


class TokenMemory(nn.Module):
    """The scorer, and the base model whose frozen LLM, tokenizer and retrieval keys it uses (an
    ``MBCModel`` of ``config.base``; of its adapter only the KV-LoRA is ever trained or read, by a
    trained reader)."""

    def __init__(self, config: TokenMemoryConfig, base):
        super().__init__()
        if not 1 <= config.layer <= base.layout.num_layers:
            raise MBCError(f"layer={config.layer} is outside the base LLM's {base.layout.num_layers} layers")
        self.config, self.base = config, base
        self.scorer = nn.Linear(2 * base.layout.hidden_size, 1)
        self.codec = TokenCodec(len(base.tokenizer), config.keep)

    @classmethod
    def build(cls, config: TokenMemoryConfig | None = None) -> "TokenMemory":
        from mbc.model import MBCModel

        config = config or TokenMemoryConfig()
        return cls(config, MBCModel.build(MBCConfig.from_dict(config.base))).eval()

    def keeping(self, keep: int) -> "TokenMemory":
        """The same memory keeping ``keep`` tokens per document (scorer and retrieval keys shared)."""
        other = TokenMemory(replace(self.config, keep=keep), self.base)
        other.scorer = self.scorer
        return other.eval()

    @property
    def tokenizer(self):
        return self.base.tokenizer

    document_tokenizer = tokenizer  # what memory/service.py cuts long documents into passages by

    @property
    def retrieval_keys(self):
        return self.base.retrieval_keys

    def retrieval_keys_of(self, documents: list[str]) -> np.ndarray:
        return self.base.retrieval_keys_of(documents)

    def stored_keys(self, bank, ids: list[int]) -> torch.Tensor:
        """What a reader keeps of each stored document: its retrieval key and its kept token ids,
        [n, subspaces + keep] (the second half a lexical index at no stored byte: network/lexical.py)."""
        tokens = torch.as_tensor(bank.entries(ids)[:, :, 0].astype(np.int64))
        return torch.cat([self.base.stored_keys(bank, ids), tokens], dim=1)

    @torch.no_grad()
    def top_documents(self, questions: list[str], document_keys) -> torch.Tensor:
        """[B, 1] the position in ``document_keys`` (``stored_keys``) of the document whose kept
        tokens each question reads: the best by retrieval key plus ``lexical_weight`` x BM25 over
        the kept tokens."""
        subspaces = self.base.config.retrieval_subspaces
        keys, tokens = document_keys[:, :subspaces], document_keys[:, subspaces:]
        scores = self.retrieval_keys.scores(self.base.embedder(questions), keys)
        if self.config.lexical_weight:
            asked = self.tokenizer(questions)["input_ids"]
            scores = combined(scores, bm25(asked, tokens, self.codec.pad), self.config.lexical_weight)
        return scores.topk(1, dim=1).indices

    # ---- which tokens a document keeps ---------------------------------------------------------
    @torch.no_grad()
    def token_features(self, texts: list[str], batch_size: int = 16, progress: bool = False):
        """Per text: its token ids, their character spans, and features [tokens, 2 x hidden] (each
        token's hidden state entering ``layer`` beside its successor's). Texts of similar length run
        together, padded on the right (which causal attention keeps from every real token)."""
        from mbc.model import pad

        encoded = [
            self.tokenizer(t, return_offsets_mapping=True, truncation=True, max_length=self.config.max_document_tokens)
            for t in texts
        ]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]["input_ids"]))
        out: list = [None] * len(texts)
        with lora_disabled(self.base.llm):
            for first in tqdm(range(0, len(order), batch_size), desc="LLM hidden states", disable=not progress):
                members = order[first : first + batch_size]
                ids = [encoded[i]["input_ids"] for i in members]
                mask = pad([[1] * len(t) for t in ids], 0, side="right").to(self.base.device)
                tokens = pad(ids, 0, side="right").to(self.base.device)
                hidden = lower_hidden(self.base.llm, self.base.layout, tokens, mask, self.config.layer).float()
                for row, i in enumerate(members):
                    states = hidden[row, : len(ids[row])]
                    following = torch.cat([states[1:], states.new_zeros(1, states.shape[1])])
                    out[i] = (ids[row], encoded[i]["offset_mapping"], torch.cat([states, following], dim=1))
        return out

    @torch.no_grad()
    def kept_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's ``keep`` best-scored token ids, in document order (all of a shorter text's)."""
        return [self.keep_best(ids, features) for ids, _, features in self.token_features(texts)]

    @torch.no_grad()
    def keep_best(self, ids: list[int], features: torch.Tensor) -> list[int]:
        """Of one text's token ids and their ``token_features``, the ``keep`` best-scored, in order."""
        if len(ids) <= self.config.keep:
            return list(ids)
        best = self.scorer(features.to(self.scorer.weight.dtype)).squeeze(1).topk(self.config.keep).indices
        return [ids[i] for i in best.sort().values.tolist()]

    def compress(self, documents: list[str]) -> np.ndarray:
        """Documents -> bank entries [N, keep, 1] (what ``memory/ingest.py`` stores)."""
        return self.codec.encode(self.kept_ids(check_texts(documents, "documents")))

    def texts(self, entries: np.ndarray) -> list[str]:
        """Bank entries -> the kept tokens of each document, as text."""
        return [self.tokenizer.decode(ids) for ids in self.codec.decode(entries)]

    # ---- answering (through a RetrievalReader over a bank: memory/readers.py) -----------------
    @torch.no_grad()
    def answer_read(self, reader, questions: list[str], decoding: DecodingConfig | None = None):
        """Each question answered by the base LLM reading its top-1 document's kept tokens; and the
        bank ids it read."""
        read = reader.top_ids(questions)
        contexts = self.texts(reader.bank.entries([ids[0] for ids in read]))
        by_context: dict[str, list[int]] = {}
        for i, context in enumerate(contexts):
            by_context.setdefault(context, []).append(i)
        # One document's prompts run together, so that their common start runs once; documents read
        # by one question each run together in one batch.
        batches = [members for members in by_context.values() if len(members) > 1]
        batches.append([members[0] for members in by_context.values() if len(members) == 1])
        answers: list = [None] * len(questions)
        for members in filter(None, batches):
            prompts = [self.prompt(contexts[i], questions[i]) for i in members]
            for i, answer in zip(members, self.continue_prompts(prompts, decoding)):
                answers[i] = answer
        return answers, read

    def prompt(self, context: str, question: str) -> str:
        """What the LLM reads: the kept tokens as context, worked examples (which teach the
        untrained LLM the short-answer format; a reader starts training from there), the question."""
        from mbc.evaluation.baselines import context_prompt

        return context_prompt(context, question)

    def continue_prompts(self, prompts: list[str], decoding: DecodingConfig | None = None) -> list[str]:
        """The LLM's answer to each prompt text: with the trained reader's KV-LoRA, or the base LLM alone."""
        if self.config.trained_reader:
            return self.base.generate([self.tokenizer(p)["input_ids"] for p in prompts], None, decoding)
        from mbc.evaluation.baselines import answer_prompts

        return answer_prompts(self.base, prompts, decoding)

    # ---- the bank it writes, and saving ------------------------------------------------------
    def bank_layout(self):
        from mbc.memory.bank import BankLayout

        base = self.base.config
        return BankLayout(
            self.codec.mode,
            self.config.keep,
            1,
            self.codec.codebook_size,
            self.base.layout.hidden_size,
            self.bank_fingerprint(),
            base.retrieval_subspaces,
            base.retrieval_codes,
        )

    def bytes_per_document(self) -> dict[str, float]:
        tokens = packed_size(self.config.keep, self.codec.codebook_size)  # 2 bytes a token for SmolLM2
        return {"tokens": tokens, "retrieval_key": self.base.bytes_per_document()["retrieval_key"]}

    def bank_fingerprint(self) -> str:
        """What a stored entry's meaning depends on: the scorer that chose the tokens (the tokenizer
        is fixed by the base LLM the config names) and the retrieval keys' centroids."""
        return fingerprint([self.scorer.weight, self.scorer.bias, self.retrieval_keys.centroids])

    codebook_fingerprint = bank_fingerprint  # what checkpoint.py records and checks

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        keys = {f"base.retrieval_keys.{k}": v for k, v in self.retrieval_keys.state_dict().items()}
        reader = {}
        if self.config.trained_reader:  # the base LLM's KV-LoRA, trained to read kept tokens
            reader = {f"base.{k}": v.detach().cpu().clone() for k, v in self.base.state_dict().items() if ".lora_" in k}
        return {**{f"scorer.{k}": v for k, v in self.scorer.state_dict().items()}, **keys, **reader}

    def save_pretrained(self, folder: str | Path) -> None:
        checkpoint.save(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "TokenMemory":
        model = cls.build(TokenMemoryConfig.from_dict(checkpoint.read_config_dict(folder)))
        checkpoint.load_state(model, folder)
        return model.eval()


def is_token_memory(folder: str | Path) -> bool:
    """Whether a checkpoint folder holds a token memory (rather than an MBC or MAC adapter)."""
    return checkpoint.read_config_dict(folder).get("kind") == KIND


# ---- training: fit the retrieval keys and the scorer on training documents ---------------------
def answer_labels(text: str, spans, answers: set[str], before: int = 0) -> torch.Tensor:
    """1 for each token whose characters overlap an occurrence of one of ``answers`` in ``text``,
    and for the ``before`` tokens ahead of each such run."""
    covered = [False] * len(text)
    for answer in answers:
        for found in re.finditer(re.escape(answer), text):
            covered[found.start() : found.end()] = [True] * (found.end() - found.start())
    labels = [float(any(covered[start:end])) for start, end in spans]
    for i in [i for i, label in enumerate(labels) if label and (i == 0 or not labels[i - 1])]:
        for j in range(max(i - before, 0), i):
            labels[j] = 1.0
    return torch.tensor(labels)


def fit_scorer(scorer: nn.Linear, features: torch.Tensor, labels: torch.Tensor, steps: int = 600, seed: int = 0):
    """Logistic regression on standardised features, both classes weighted alike (answers are a few
    percent of the tokens); the standardisation is folded into the layer afterwards."""
    generator = torch.Generator().manual_seed(seed)
    nn.init.zeros_(scorer.weight)
    nn.init.zeros_(scorer.bias)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-3, weight_decay=0.01)
    positive = labels.mean().clamp(1e-3, 1 - 1e-3)
    loss_of = nn.BCEWithLogitsLoss(pos_weight=(1 - positive) / positive)
    mean, std = features.mean(0), features.std(0) + 1e-5
    with torch.enable_grad():
        for _ in range(steps):
            batch = torch.randint(0, len(features), (4096,), generator=generator)
            loss = loss_of(scorer((features[batch] - mean) / std).squeeze(1), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():  # score = w . (x - mean) / std + b
        weight = scorer.weight / std
        scorer.bias -= (weight * mean).sum()
        scorer.weight.copy_(weight)


def train_token_memory(
    rows,
    config: TokenMemoryConfig | None = None,
    before: int = 2,
    steps: int = 600,
    reader_steps: int = 0,
    mixed_precision: str = "no",
    save_to: str | Path | None = None,
):
    """A token memory fitted on training questions (``QAExample`` rows): the retrieval keys'
    centroids on their documents, the scorer on their documents' tokens, labelled by the answers;
    with ``reader_steps``, then a reader trained on what it keeps (``train_reader``, in
    ``mixed_precision``). ``save_to``: the reader's progress is saved there as it trains (and the
    memory when it is done), and where a saved reader is found the fit is not repeated: training
    continues from it (to ``reader_steps`` in all)."""
    from mbc.data import documents as distinct_documents

    _check_precision(mixed_precision)  # before minutes of fitting
    texts = distinct_documents(rows)
    if not texts:
        raise MBCError("no training documents: a token memory learns which tokens to keep from training questions")
    fitted_with = {"before": before, "steps": steps}
    if reader_steps and save_to is not None and has_training_state(Path(save_to)):
        model = TokenMemory.from_pretrained(save_to)
        _check_same_memory(model.config, config or TokenMemoryConfig(), save_to)
        train_reader(
            model, rows, reader_steps, mixed_precision=mixed_precision, save_to=save_to, fitted_with=fitted_with
        )
        return model
    model = TokenMemory.build(config)
    model.base.fit_retrieval_keys(texts)
    answers_of: dict[str, set[str]] = {}
    for row in rows:
        answers_of.setdefault(row.document, set()).update(row.answers)
    tokens = model.token_features(texts, progress=True)
    labels = torch.cat([answer_labels(t, spans, answers_of[t], before) for t, (_, spans, _) in zip(texts, tokens)])
    if not labels.any():
        raise MBCError("no answer occurs in its document's text: the scorer has no token to learn to keep")
    fit_scorer(model.scorer, torch.cat([f for _, _, f in tokens]), labels, steps)
    if reader_steps:
        kept = {text: model.tokenizer.decode(model.keep_best(ids, f)) for text, (ids, _, f) in zip(texts, tokens)}
        del tokens, labels  # the features: ~1 GB on SQuAD's training paragraphs
        train_reader(
            model,
            rows,
            reader_steps,
            kept_texts=kept,
            mixed_precision=mixed_precision,
            save_to=save_to,
            fitted_with=fitted_with,
        )
    elif save_to is not None:
        model.save_pretrained(save_to)
    return model


def _check_precision(mixed_precision: str) -> None:
    if mixed_precision not in ("no", "bf16"):
        raise MBCError(f"mixed_precision={mixed_precision!r}: choose 'no' or 'bf16'")


def _check_same_memory(saved: TokenMemoryConfig, asked: TokenMemoryConfig, folder) -> None:
    saved_values, asked_values = asdict(replace(saved, trained_reader=False)), asdict(asked)
    differ = [f"{k} {saved_values[k]!r} -> {v!r}" for k, v in asked_values.items() if saved_values[k] != v]
    if differ:
        raise MBCError(
            f"{folder} holds a token memory with other settings ({'; '.join(differ)}): train into a new --output "
            "folder, or continue it with the same settings"
        )


def train_reader(
    model: TokenMemory,
    rows,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 3e-4,
    seed: int = 0,
    kept_texts: dict[str, str] | None = None,
    mixed_precision: str = "no",
    save_to: str | Path | None = None,
    save_every_minutes: float = 10.0,
    fitted_with: dict | None = None,
) -> list[float]:
    """Train the base LLM's KV-LoRA to answer from kept tokens: each training question asked in
    ``prompt`` after its own document's kept tokens (``kept_texts``: document -> what the bank
    gives back for it), the loss on the answer tokens alone. The frozen layers below the first with
    KV-LoRA run once per row (training/activations.py). ``mixed_precision="bf16"``: the forward
    passes under bf16 autocast (the KV-LoRA and Adam stay float32), fast on CPUs with bf16 matrix
    units (AMX), slow where they are emulated. ``save_to``: the memory and the reader's training
    state are saved there every ``save_every_minutes``, on SIGINT / SIGTERM (then
    ``TrainingInterrupted``) and at the end; a state found there is continued, to ``steps`` in all,
    when this run's settings (``fitted_with`` too: how the memory was fitted) are the saved run's.
    Returns the loss of every step (the saved ones included)."""
    from mbc.data import documents as distinct_documents
    from mbc.model import IGNORE, pad
    from mbc.training.activations import FrozenStore
    from mbc.training.trainer import StopRequests

    base = model.base
    adapters = [p for name, p in base.llm.named_parameters() if ".lora_" in name]
    if not adapters:
        raise MBCError("the token memory's base LLM carries no KV-LoRA to train: give its base config lora_layers > 0")
    _check_precision(mixed_precision)
    if kept_texts is None:
        texts = distinct_documents(rows)
        kept_texts = dict(zip(texts, model.texts(model.compress(texts))))
    examples = [
        (model.tokenizer(model.prompt(kept_texts[r.document], r.question))["input_ids"], base.answer_ids(r.answers[0]))
        for r in rows
    ]
    optimizer = torch.optim.Adam(adapters, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant; saved with the state
    settings = {
        "rows": len(rows),
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "mixed_precision": mixed_precision,
        "fitted_with": fitted_with or {},
        "kept": _fingerprint_texts(kept_texts[r.document] + "\n" + r.question for r in rows),
    }
    shuffle = random.Random(seed)
    progress = {"step": 0, "order": [], "losses": [], "shuffle": repr(shuffle.getstate()), "settings": settings}
    if save_to is not None and has_training_state(Path(save_to)):
        progress = _resumed_reader(Path(save_to), optimizer, schedule, settings)
        shuffle.setstate(python_rng_state(progress["shuffle"]))
    lower_rows, order, losses = FrozenStore().part("reader rows"), progress["order"], progress["losses"]

    def save() -> None:
        model.config = replace(model.config, trained_reader=True)
        with checkpoint.replacing(save_to) as partial:
            checkpoint.write(model, partial)
            save_training_state(partial, optimizer, schedule, {**progress, "shuffle": repr(shuffle.getstate())})

    model.train()
    saved_at = time.perf_counter()
    # Ctrl-C and SIGTERM stop at the end of a step, saved, where there is somewhere to save to.
    with torch.enable_grad(), StopRequests() if save_to is not None else nullcontext() as stops:
        bar = tqdm(range(progress["step"], steps), desc="reader", initial=progress["step"], total=steps)
        for step in bar:
            if len(order) < batch_size:  # epoch after epoch, each in its own order
                order += shuffle.sample(range(len(examples)), len(examples))
            batch, order[:] = [examples[i] for i in order[:batch_size]], order[batch_size:]
            ids = [prompt + answer for prompt, answer in batch]
            mask = pad([[1] * len(i) for i in ids], 0).to(base.device)
            labels = pad([[IGNORE] * len(prompt) + answer for prompt, answer in batch], IGNORE).to(base.device)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
                lower = lower_rows.padded([tuple(i) for i in ids], base.device, base.lower_hidden)
                loss = base.qa_loss_from_lower(lower, mask, labels, None).float()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress["step"] = step + 1
            if step % 10 == 9:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
            if stops is not None and stops.signum is not None:
                save()
                raise _reader_interrupted(progress["step"], steps, save_to, stops.signum)
            if save_to is not None and time.perf_counter() - saved_at > 60 * save_every_minutes:
                save()
                saved_at = time.perf_counter()
    model.config = replace(model.config, trained_reader=progress["step"] > 0 or model.config.trained_reader)
    if save_to is not None:
        save()
    model.eval()
    return losses


def _fingerprint_texts(texts) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def _resumed_reader(folder: Path, optimizer, schedule, settings: dict) -> dict:
    """The saved reader's progress, its optimizer and RNG states restored; one line naming what
    differs when the run's settings (or the rows and kept tokens it reads) are not the saved run's."""
    saved = saved_progress(folder).get("settings", {})
    differ = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in settings.items() if saved.get(key) != value]
    if differ:
        raise MBCError(
            f"{folder} holds a reader trained with other settings ({'; '.join(differ)}): train into a new --output "
            "folder, or continue it with the same settings and data"
        )
    return load_training_state(folder, optimizer, schedule)


def _reader_interrupted(step: int, steps: int, folder, signum: int):
    from mbc.training.trainer import TrainingInterrupted

    return TrainingInterrupted(
        f"interrupted by {signal.Signals(signum).name} at reader step {step} of {steps}: the memory and its reader "
        f"are saved in {folder}; run the same command again to continue",
        signum,
    )

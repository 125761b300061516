"""Fitting a token memory (token_memory.py) on training questions, and training its reader.

- ``train_token_memory``: the retrieval keys' centroids on the training documents, and the scorer
  that chooses which tokens a document keeps, fitted to flag the tokens of answers (``answer_labels``,
  ``fit_scorer``: logistic regression; seconds), over the frozen LLM's hidden states (minutes);
- ``train_reader``: the base LLM's KV-LoRA trained on the QA loss to answer from kept tokens, in the
  worked-example prompt the untrained LLM reads; saved as it trains and continued where it stopped.
"""

from __future__ import annotations

import re
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from mbc.errors import MBCError
from mbc.token_memory import TokenMemory, TokenMemoryConfig
from mbc.training.adapters import AdapterRun, fingerprint_texts, kv_lora, train_adapters
from mbc.training.run import refuse_other_settings
from mbc.training.state import has_training_state


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
    trained_on: str | None = None,
    writer_learning_rate: float = 1e-5,
):
    """A token memory fitted on training questions (``QAExample`` rows): the retrieval keys'
    centroids on their documents, the scorer on their documents' tokens, labelled by the answers
    (and with ``entry_bytes`` the prefix code on their tokens);
    with ``reader_steps``, then a reader trained on what it keeps (``train_reader``, in
    ``mixed_precision``; written codes' layer at ``writer_learning_rate``). ``save_to``: the reader's
    progress is saved there as it trains (and the memory when it is done), and where a saved reader is
    found the fit is not repeated: training continues from it (to ``reader_steps`` in all).
    ``trained_on``: a line saying what ``rows`` are, kept in the saved memory for its users
    (``describe_training``)."""
    from mbc.data import documents as distinct_documents

    run = AdapterRun(
        mixed_precision=mixed_precision, save_to=save_to, writer_learning_rate=writer_learning_rate
    )  # checked before minutes of fitting
    texts = distinct_documents(rows)
    if not texts:
        raise MBCError("no training documents: a token memory learns which tokens to keep from training questions")
    fitted_with = {"before": before, "steps": steps}
    if reader_steps and save_to is not None and has_training_state(Path(save_to)):
        model = TokenMemory.from_pretrained(save_to)
        _check_same_memory(model.config, config or TokenMemoryConfig(), save_to)
        model.trained_on = trained_on or model.trained_on
        _train_reading(model, rows, reader_steps, run, fitted_with)
        return model
    torch.manual_seed(run.seed)  # the KV-LoRA's initial A matrices
    model = TokenMemory.build(config)
    model.trained_on = trained_on
    model.retrieval_keys.fit(texts)
    answers_of: dict[str, set[str]] = {}
    for row in rows:
        answers_of.setdefault(row.document, set()).update(row.answers)
    tokens = model.token_features(texts, progress=True)
    labels = torch.cat([answer_labels(t, spans, answers_of[t], before) for t, (_, spans, _) in zip(texts, tokens)])
    if not labels.any():
        raise MBCError("no answer occurs in its document's text: the scorer has no token to learn to keep")
    fit_scorer(model.scorer, torch.cat([f for _, _, f in tokens]), labels, steps)
    if model.config.entry_bytes is not None:
        model.fit_code([ids for ids, _, _ in tokens])
    if reader_steps:
        tokens_by_text = dict(zip(texts, tokens))
        # Only the kept tokens' features are read from here on: free the rest (~1 GB on SQuAD's training paragraphs).
        del tokens, labels
        _train_reading(model, rows, reader_steps, run, fitted_with, tokens_by_text)
    elif save_to is not None:
        model.save_pretrained(save_to)
    return model


def _train_reading(model: TokenMemory, rows, steps: int, run: AdapterRun, fitted_with: dict, tokens=None) -> None:
    """The reader alone over kept tokens, or with written codes the writer and the reader together
    (training/vocabulary_codes.py); ``tokens``: ``token_features`` by document, where the fit has them."""
    if model.writer is not None:
        from mbc.training.vocabulary_codes import kept_from_features, train_codes

        kept = None if tokens is None else kept_from_features(model, tokens)
        train_codes(model, rows, steps, run, kept, fitted_with)
        return
    kept_texts = None
    if tokens is not None:
        kept_texts = {text: model.llm.tokenizer.decode(model.keep_best(ids, f)) for text, (ids, _, f) in tokens.items()}
    train_reader(
        model,
        rows,
        steps,
        kept_texts=kept_texts,
        mixed_precision=run.mixed_precision,
        save_to=run.save_to,
        fitted_with=fitted_with,
    )


def _check_same_memory(saved: TokenMemoryConfig, asked: TokenMemoryConfig, folder) -> None:
    refuse_other_settings(folder, "a token memory", asdict(replace(saved, trained_reader=False)), asdict(asked))


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
    from mbc.network.frozen_llm import IGNORE, pad
    from mbc.training.activations import FrozenStore

    llm = model.llm
    if kept_texts is None:
        texts = distinct_documents(rows)
        kept_texts = dict(zip(texts, model.texts(model.compress(texts))))
    examples = [
        (llm.tokenizer(model.prompt(kept_texts[r.document], r.question))["input_ids"], llm.answer_ids(r.answers[0]))
        for r in rows
    ]
    lower_rows = FrozenStore().part("reader rows")

    def batch_loss(batch) -> torch.Tensor:
        ids = [prompt + answer for prompt, answer in batch]
        mask = pad([[1] * len(i) for i in ids], 0).to(llm.device)
        labels = pad([[IGNORE] * len(prompt) + answer for prompt, answer in batch], IGNORE).to(llm.device)
        lower = lower_rows.padded([tuple(i) for i in ids], llm.device, llm.lower_hidden)
        return llm.qa_loss_from_lower(lower, mask, labels, None)

    settings = {
        "fitted_with": fitted_with or {},
        "kept": fingerprint_texts(kept_texts[r.document] + "\n" + r.question for r in rows),
    }
    run = AdapterRun(
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        mixed_precision=mixed_precision,
        save_to=save_to,
        save_every_minutes=save_every_minutes,
    )
    return train_adapters(model, kv_lora(model), examples, batch_loss, steps, run, settings, "reader")

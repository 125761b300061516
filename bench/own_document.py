"""Can the adapter learn to read a document from its memory? The easiest case, measured.

    .venv/bin/python bench/own_document.py [--lr 3e-4] [--codebook-lr LR] [--steps 200] [--threads 2] [--set KEY=VALUE ...]

Trains the CPU preset (bundled SmolLM2 + MiniLM) on generated documents where every question sees
a bank of its own document only, on the questions whose answers come from small closed sets
(professions, colours, products), so that a 12-code memory can carry them. Every 25 steps it prints
the held-out QA loss (40 unseen documents) with each question's own document in the bank and with
another document's: when the adapter reads its memory, the first falls below the second.
bench/reading_parts.py trains each half of this reading path on its own.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from mbc import MBCConfig, MBCModel
from mbc.data.generated import ANSWER_KINDS, COLOURS, PRODUCTS, PROFESSIONS, answer_kind, generate_examples
from mbc.presets import preset
from mbc.settings import parse_overrides
from mbc.training.trainer import TrainConfig, parameter_groups


def closed_set_split(held_out_questions: int = 48, closed_only: bool = True):
    """(training rows, held-out rows): questions with closed-set answers (``closed_only=False``:
    every question, open answers too, and the held-out rows come as {answer kind: rows}, kinds as
    ``mbc.generated.answer_kind`` names them); 40 documents held out."""
    closed = set(PROFESSIONS) | set(COLOURS) | set(PRODUCTS)
    rows = [r for r in generate_examples(1200, 0) if r.answers[0] in closed or not closed_only]
    held_out = set(list(dict.fromkeys(r.document for r in rows))[:40])
    train = [r for r in rows if r.document not in held_out]
    test = [r for r in rows if r.document in held_out][:held_out_questions]
    print(f"{len(train)} training questions, {len(test)} held-out questions", flush=True)
    if closed_only:
        return train, test
    return train, {kind: [r for r in test if answer_kind(r.answers[0]) == kind] for kind in ANSWER_KINDS}


def train_and_report(
    model: MBCModel,
    loss_fn,
    memory_of,
    train,
    test,
    steps: int,
    report_every: int,
    lr: float,
    codebook_lr: float | None = None,
    batch_size: int = 8,
    after_step=None,
    encoder_lr: float | None = None,
) -> None:
    """Adam (the encoders at ``encoder_lr``, default lr / 10) on ``loss_fn(model, rows, memory_of(rows)) -> (loss, extras)``,
    each question reading its own memory; every ``report_every`` steps, the held-out loss (and
    extras) with each question's own memory and with another question's: for the ``test`` rows, or
    for each group of them if ``test`` is {label: rows}. ``after_step(step)``, if given, runs after
    each optimizer step."""
    groups = parameter_groups(
        model,
        TrainConfig(learning_rate=lr, encoder_learning_rate=encoder_lr or lr / 10, codebook_learning_rate=codebook_lr),
    )
    optimizer = torch.optim.Adam(groups)
    parameters = [p for group in groups for p in group["params"]]
    tests = test if isinstance(test, dict) else {"": test}
    rng, window, start = random.Random(0), [], time.time()
    for step in range(1, steps + 1):
        loss, extras = loss_fn(model, batch := rng.sample(train, batch_size), memory_of(batch))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        window.append({"loss": loss.item(), **extras})
        if step % report_every == 0:
            trained = {
                key: sum(w[key] for w in window if key in w) / sum(key in w for w in window) for key in window[-1]
            }
            line = f"step {step}: train loss {trained.pop('loss'):.3f}"
            line += "".join(f", training {k} {v:.1f}" for k, v in trained.items() if k == "perplexity")
            model.eval()
            with torch.no_grad():
                line += "".join(_held_out(model, loss_fn, memory_of, label, rows) for label, rows in tests.items())
            model.train()
            print(f"{line} ({time.time() - start:.0f} s)", flush=True)
            window = []


def _held_out(model: MBCModel, loss_fn, memory_of, label: str, rows) -> str:
    """The held-out loss (and accuracy) of these rows with own memory and with another's."""
    own = memory_of(rows)
    other = own[7:] + own[:7]  # each held-out question gets another's memory
    (own_loss, own_extras), (other_loss, other_extras) = loss_fn(model, rows, own), loss_fn(model, rows, other)
    accuracy = lambda extras: "".join(f" ({k} {v:.2f})" for k, v in extras.items() if k == "accuracy")  # noqa: E731
    return (
        f"; {label + ' ' if label else ''}held-out loss with own memory {own_loss.item():.3f}{accuracy(own_extras)}"
        f", with another's {other_loss.item():.3f}{accuracy(other_extras)}"
    )


FLOAT_MEMORY = {"on": False}  # reading_parts.py's float-memory warm start: the bank holds the vectors, not their codes


def training_memory(model: MBCModel, documents: list[str]):
    """What the bank holds in training (codes, or the vectors during a float-memory warm start), VQ loss, perplexity."""
    contexts = model.amortize(documents)
    memory = model.codec.training_memory(contexts)
    if FLOAT_MEMORY["on"]:
        return contexts, 0.0 * memory.vq_loss, memory.perplexity
    return memory.vectors, memory.vq_loss, memory.perplexity


def qa_loss(model: MBCModel, rows, documents: list[str]):
    """QA loss with question i reading only documents[i]."""
    memory, _, _ = training_memory(model, documents)  # no VQ loss: the codebook moves by resets only
    own = torch.eye(len(documents), dtype=torch.bool).repeat_interleave(model.config.num_slots, dim=1)
    questions = [r.question for r in rows]
    prefix = model.prefix(model.modulation(questions, memory.reshape(-1, memory.shape[-1]), memory_mask=own))
    return model.llm.qa_loss(questions, [r.answers[0] for r in rows], prefix), {}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--set", action="append", default=[], help="model config KEY=VALUE (VALUE as JSON, else a string)"
    )


def bench_model(args) -> MBCModel:
    """The cpu preset's model without retrieval keys (every bank here holds the documents each
    question is given: nothing to choose between), with the --set overrides, seed 0."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    values = {**preset("cpu")["model"], "retrieval_top_k": 0}
    parse_overrides(MBCConfig, values, args.set)
    return MBCModel.build(MBCConfig(**values))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=3e-4, help="new modules; the encoder gets a tenth")
    parser.add_argument("--codebook-lr", type=float, default=None, help="the codebook (default: --lr)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    add_model_arguments(parser)
    args = parser.parse_args()
    model = bench_model(args)
    train, test = closed_set_split()
    train_and_report(
        model,
        qa_loss,
        lambda rows: [r.document for r in rows],
        train,
        test,
        args.steps,
        25,
        args.lr,
        args.codebook_lr,
        args.batch,
    )


if __name__ == "__main__":
    main()

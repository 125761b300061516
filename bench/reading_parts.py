"""Which half of MBC's reading path learns slowly? Each half trained on its own.

    .venv/bin/python bench/reading_parts.py decoder [--steps 200] [--lr 3e-4] [--set KEY=VALUE ...]
    .venv/bin/python bench/reading_parts.py encoder [--steps 300] [--lr 3e-4] [--codebook-lr LR] [--encoder-lr LR]
        [--float-memory-steps N] [--set KEY=VALUE ...]
    .venv/bin/python bench/reading_parts.py staged [--probe-steps 150] [--steps 400] [--keep-probe W] [...]

decoder: the memory holds the answer itself (the LLM's input embedding of the answer's first
token, at norm sqrt(dim), in all K slots); the question network, aggregator, prefix expansion and
KV-LoRA learn to read it on the QA loss. Prints the held-out QA loss with each question's own
answer in memory and with another question's.

encoder: no LLM pass. The amortization network, codebook, question network and aggregator learn to
put the answer's first token into the modulation (its mean over the K slots, LayerNormed, through
the LLM's frozen output embedding: a logit lens; ``--probe-tokens all``: slot k names answer token
k), plus the VQ loss; accuracy is always the first token's. Prints the held-out probe loss
and top-1 accuracy with each question's own document and with another's, and the codebook
perplexity of the training batches. ``--float-memory-steps N``: the memory bypasses the codebook
for the first N steps, then the codebook is k-means-fitted to the training documents' vectors
(training's ``float_memory_steps``).

staged: the encoder half's objective for the first ``--probe-steps`` steps, then the QA loss end
to end (bench/own_document.py's ``qa_loss``): does a document side that already carries the answer
let the LLM side learn to read it as fast as the decoder half does? From the switch on it prints
the held-out QA loss with own and another's document, comparable with bench/own_document.py
at the same step. ``--keep-probe W``: after the switch the loss is QA + W x probe (training's
``probe_weight``).

Same data and split as bench/own_document.py (answers from small closed sets, 40 held-out
documents; ``--open-answers``: every generated question, held-out figures by answer kind), the CPU
preset's model, batches of 8.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from own_document import (
    FLOAT_MEMORY,
    add_model_arguments,
    bench_model,
    closed_set_split,
    qa_loss,
    train_and_report,
    training_memory,
)

from mbc import MBCModel
from mbc.training.objectives import answer_probe_logits, answer_probe_loss


def answer_memory(model: MBCModel, answers: list[str]) -> torch.Tensor:
    """[B, K, dim]: each answer's first-token input embedding at norm sqrt(dim), in every slot."""
    ids = torch.tensor([model.llm.answer_ids(a)[0] for a in answers])
    with torch.no_grad():
        vectors = F.normalize(model.llm.model.get_input_embeddings()(ids), dim=-1) * model.llm.layout.hidden_size**0.5
    return vectors[:, None].expand(-1, model.config.num_slots, -1)


def modulation_reading(model: MBCModel, questions: list[str], memory: torch.Tensor) -> torch.Tensor:
    """Question i reads memory[i] [K, dim] only."""
    own = torch.eye(len(questions), dtype=torch.bool).repeat_interleave(model.config.num_slots, dim=1)
    return model.modulation(questions, memory.reshape(-1, memory.shape[-1]), memory_mask=own)


def decoder_loss(model: MBCModel, rows, memory_answers: list[str]):
    questions = [r.question for r in rows]
    prefix = model.prefix(modulation_reading(model, questions, answer_memory(model, memory_answers)))
    return model.llm.qa_loss(questions, [r.answers[0] for r in rows], prefix), {}


def encoder_loss(model: MBCModel, rows, documents: list[str], probe: str = "first"):
    memory, vq_loss, perplexity = training_memory(model, documents)
    modulation = modulation_reading(model, [r.question for r in rows], memory)
    answers = [r.answers[0] for r in rows]
    first = torch.tensor([model.llm.answer_ids(a)[0] for a in answers])
    first_logits = answer_probe_logits(model, modulation, probe)
    first_logits = first_logits if probe == "first" else first_logits[:, 0]
    extra = {"accuracy": (first_logits.argmax(-1) == first).float().mean().item()}
    if model.quantizer is not None:
        extra["perplexity"] = perplexity.item()
    return answer_probe_loss(model, modulation, answers, probe) + vq_loss, extra


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("half", choices=["decoder", "encoder", "staged"])
    parser.add_argument("--lr", type=float, default=3e-4, help="new modules; the encoder gets a tenth")
    parser.add_argument("--codebook-lr", type=float, default=None, help="the codebook (default: --lr)")
    parser.add_argument("--encoder-lr", type=float, default=None, help="the pretrained encoders (default: --lr / 10)")
    parser.add_argument("--steps", type=int, default=None, help="default: 200 (decoder), 300 (encoder)")
    parser.add_argument(
        "--float-memory-steps", type=int, default=0, help="encoder, staged: steps before the codebook is used"
    )
    parser.add_argument(
        "--probe-steps", type=int, default=150, help="staged: steps on the encoder half's objective before the QA loss"
    )
    parser.add_argument(
        "--keep-probe",
        type=float,
        default=0.0,
        help="staged: after the switch, add this weight x the probe loss to the QA loss",
    )
    parser.add_argument(
        "--probe-tokens",
        choices=["first", "all"],
        default="first",
        help="encoder, staged: the probe's targets (mbc.training.objectives.answer_probe_loss)",
    )
    parser.add_argument(
        "--open-answers", action="store_true", help="every generated question, not only closed-set answers"
    )
    add_model_arguments(parser)
    args = parser.parse_args()
    model = bench_model(args)
    train, test = closed_set_split(
        held_out_questions=(96 if args.half == "encoder" else 48) * (3 if args.open_answers else 1),
        closed_only=not args.open_answers,
    )
    documents = list(dict.fromkeys(r.document for r in train))
    FLOAT_MEMORY["on"] = args.float_memory_steps > 0
    done = {"steps": 0}

    def after_step(step: int) -> None:
        done["steps"] = step
        if step == args.float_memory_steps:
            model.fit_codebook(documents)
            FLOAT_MEMORY["on"] = False
            print(f"step {step}: codebook fitted (k-means) to {len(documents)} training documents' vectors", flush=True)
        if args.half == "staged" and step == args.probe_steps:
            print(f"step {step}: from here on the QA loss end to end", flush=True)

    probe_loss = partial(encoder_loss, probe=args.probe_tokens)

    def staged_loss(model, rows, documents):
        if done["steps"] < args.probe_steps:
            return probe_loss(model, rows, documents)
        loss, extras = qa_loss(model, rows, documents)
        if args.keep_probe and model.training:  # held-out figures stay the QA loss alone
            loss = loss + args.keep_probe * probe_loss(model, rows, documents)[0]
        return loss, extras

    if args.half == "decoder":
        loss, memory_of = decoder_loss, lambda rows: [r.answers[0] for r in rows]
    else:
        loss, memory_of = probe_loss if args.half == "encoder" else staged_loss, lambda rows: [r.document for r in rows]
    default_steps = {"decoder": 200, "encoder": 300, "staged": 400}[args.half]
    train_and_report(
        model,
        loss,
        memory_of,
        train,
        test,
        steps=args.steps or default_steps,
        report_every=25 if args.half == "decoder" else 50,
        lr=args.lr,
        codebook_lr=args.codebook_lr,
        encoder_lr=args.encoder_lr,
        after_step=after_step,
    )


if __name__ == "__main__":
    main()

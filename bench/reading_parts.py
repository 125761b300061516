"""Which half of MBC's reading path learns slowly? Each half trained on its own.

    .venv/bin/python bench/reading_parts.py decoder [--steps 200] [--lr 3e-4] [--set KEY=VALUE ...]
    .venv/bin/python bench/reading_parts.py encoder [--steps 300] [--lr 3e-4] [--codebook-lr LR] [--float-memory-steps N] [--set KEY=VALUE ...]

decoder: the memory holds the answer itself (the LLM's input embedding of the answer's first
token, at norm sqrt(dim), in all K slots); the question network, aggregator, prefix expansion and
KV-LoRA learn to read it on the QA loss. Prints the held-out QA loss with each question's own
answer in memory and with another question's.

encoder: no LLM pass. The amortization network, codebook, question network and aggregator learn to
put the answer's first token into the modulation (its mean over the K slots, LayerNormed, through
the LLM's frozen output embedding: a logit lens), plus the VQ loss. Prints the held-out probe loss
and top-1 accuracy with each question's own document and with another's, and the codebook
perplexity of the training batches. ``--float-memory-steps N``: the memory bypasses the codebook
for the first N steps, then the codebook is k-means-fitted to the training documents' vectors
(training's ``float_memory_steps``).

Same data and split as bench/own_document.py (answers from small closed sets, 40 held-out
documents), the CPU preset's model, batches of 8.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from mbc import MBCConfig, MBCModel
from mbc.config import apply_overrides
from mbc.presets import preset
from own_document import closed_set_split, train_and_report


def answer_memory(model: MBCModel, answers: list[str]) -> torch.Tensor:
    """[B, K, dim]: each answer's first-token input embedding at norm sqrt(dim), in every slot."""
    ids = torch.tensor([model.answer_ids(a)[0] for a in answers])
    with torch.no_grad():
        vectors = F.normalize(model.llm.get_input_embeddings()(ids), dim=-1) * model.layout.hidden_size**0.5
    return vectors[:, None].expand(-1, model.config.num_slots, -1)


def modulation_reading(model: MBCModel, questions: list[str], memory: torch.Tensor) -> torch.Tensor:
    """Question i reads memory[i] [K, dim] only."""
    own = torch.eye(len(questions), dtype=torch.bool).repeat_interleave(model.config.num_slots, dim=1)
    return model.modulation(questions, memory.reshape(-1, memory.shape[-1]), memory_mask=own)


def decoder_loss(model: MBCModel, rows, memory_answers: list[str]):
    questions = [r.question for r in rows]
    prefix = model.prefix(modulation_reading(model, questions, answer_memory(model, memory_answers)))
    return model.qa_loss(questions, [r.answers[0] for r in rows], prefix), {}


def encoder_loss(model: MBCModel, rows, documents: list[str]):
    memory, vq_loss, perplexity = model.training_memory(model.amortize(documents))
    modulation = modulation_reading(model, [r.question for r in rows], memory)
    logits = model.llm.get_output_embeddings()(F.layer_norm(modulation.mean(1), modulation.shape[-1:]))
    first = torch.tensor([model.answer_ids(r.answers[0])[0] for r in rows])
    extra = {"accuracy": (logits.argmax(-1) == first).float().mean().item()}
    if model.quantizer is not None:
        extra["perplexity"] = perplexity.item()
    return F.cross_entropy(logits, first) + vq_loss, extra


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("half", choices=["decoder", "encoder"])
    parser.add_argument("--lr", type=float, default=3e-4, help="new modules; the encoder gets a tenth")
    parser.add_argument("--codebook-lr", type=float, default=None, help="the codebook (default: --lr)")
    parser.add_argument("--steps", type=int, default=None, help="default: 200 (decoder), 300 (encoder)")
    parser.add_argument("--float-memory-steps", type=int, default=0, help="encoder: steps before the codebook is used")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="model config KEY=VALUE (VALUE as JSON, else a string)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    values = {**preset("cpu")["model"], "retrieval_top_k": 0}
    apply_overrides(values, args.set)
    model = MBCModel.build(MBCConfig(**values))
    train, test = closed_set_split(held_out_questions=96 if args.half == "encoder" else 48)
    after_step = None
    if args.float_memory_steps:
        model.codebook_bypassed = True
        documents = list(dict.fromkeys(r.document for r in train))

        def after_step(step: int) -> None:
            if step == args.float_memory_steps:
                model.fit_codebook(documents)
                print(f"step {step}: codebook fitted (k-means) to {len(documents)} training documents' vectors", flush=True)
    if args.half == "decoder":
        loss, memory_of = decoder_loss, lambda rows: [r.answers[0] for r in rows]
    else:
        loss, memory_of = encoder_loss, lambda rows: [r.document for r in rows]
    train_and_report(model, loss, memory_of, train, test, steps=args.steps or (200 if args.half == "decoder" else 300),
                     report_every=25 if args.half == "decoder" else 50, lr=args.lr, codebook_lr=args.codebook_lr,
                     after_step=after_step)


if __name__ == "__main__":
    main()

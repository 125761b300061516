"""Can the adapter learn to read a document from its memory? The easiest case, measured.

    .venv/bin/python bench/own_document.py [--lr 3e-4] [--codebook-lr LR] [--steps 200] [--threads 2] [--set KEY=VALUE ...]

Trains the CPU preset (bundled SmolLM2 + MiniLM) on generated documents where every question sees
a bank of its own document only, on the questions whose answers come from small closed sets
(professions, colours, products), so that a 12-code memory can carry them. Every 25 steps it prints
the held-out QA loss (40 unseen documents) with each question's own document in the bank and with
another document's: when the adapter reads its memory, the first falls below the second.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from mbc import MBCConfig, MBCModel
from mbc.generated import COLOURS, PRODUCTS, PROFESSIONS, generate_examples
from mbc.presets import preset
from mbc.train import TrainConfig, _parameter_groups


def qa_loss(model: MBCModel, rows, documents: list[str]) -> torch.Tensor:
    """QA loss with question i reading only documents[i]."""
    contexts = model.amortize(documents)
    memory = model.quantizer(contexts).quantized if model.quantizer is not None else contexts
    own = torch.eye(len(documents), dtype=torch.bool).repeat_interleave(model.config.num_slots, dim=1)
    questions = [r.question for r in rows]
    prefix = model.prefix(model.modulation(questions, memory.reshape(-1, memory.shape[-1]), memory_mask=own))
    return model.qa_loss(questions, [r.answers[0] for r in rows], prefix)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=3e-4, help="new modules; the encoder gets a tenth")
    parser.add_argument("--codebook-lr", type=float, default=None, help="the codebook (default: --lr)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="model config KEY=VALUE (JSON value)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    values = preset("cpu")["model"]
    values["retrieval_top_k"] = 0  # every bank here holds one document: nothing to choose between
    values.update({k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)})
    model = MBCModel.build(MBCConfig(**values))

    closed = set(PROFESSIONS) | set(COLOURS) | set(PRODUCTS)
    rows = [r for r in generate_examples(1200, 0) if r.answers[0] in closed]
    held_out = set(list(dict.fromkeys(r.document for r in rows))[:40])
    train = [r for r in rows if r.document not in held_out]
    test = [r for r in rows if r.document in held_out][:48]
    others = [r.document for r in test][7:] + [r.document for r in test][:7]  # each question gets another's document
    print(f"{len(train)} training questions, {len(test)} held-out questions", flush=True)

    train_config = TrainConfig(learning_rate=args.lr, encoder_learning_rate=args.lr / 10, codebook_learning_rate=args.codebook_lr)
    groups = _parameter_groups(model, train_config)
    optimizer = torch.optim.Adam(groups)
    parameters = [p for group in groups for p in group["params"]]
    rng, running, start = random.Random(0), 0.0, time.time()
    for step in range(1, args.steps + 1):
        batch = rng.sample(train, args.batch)
        loss = qa_loss(model, batch, [r.document for r in batch])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        running += loss.item()
        if step % 25 == 0:
            model.eval()
            with torch.no_grad():
                own, other = qa_loss(model, test, [r.document for r in test]).item(), qa_loss(model, test, others).item()
            model.train()
            print(f"step {step}: train loss {running / 25:.3f}, held-out loss with own document {own:.3f}, "
                  f"with another document {other:.3f} ({time.time() - start:.0f} s)", flush=True)
            running = 0.0


if __name__ == "__main__":
    main()

"""Does a trained checkpoint use its memory? Figures that tell, on held-out documents.

    .venv/bin/python bench/memory_use.py CHECKPOINT [--data generated] [--questions 24]

Prints, for the validation split: how many distinct codes each slot takes over the documents
(MBC), how far document vectors vary across documents against their size, how far the modulation
varies between questions, how many of the prefix blocks' tanh units are saturated, how sharp the
first aggregation block's attention over the bank is, and how much the modulation and the prefix
move when the bank of the right documents is swapped for a bank of
as many unrelated (training) documents. If the prefix does not move, the answers cannot depend on
the memory, whatever the scores say.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from mbc import MBCModel
from mbc import data as qa_data
from mbc.evaluation.validation import reader_over


def saturated_share(model: MBCModel, modulation: torch.Tensor) -> float:
    """Share of the prefix blocks' tanh inputs with |x| > 3, where tanh is flat and ignores its input."""
    expansion = model.prefix_expansion
    if model.modulation_norm is not None:
        modulation = model.modulation_norm(modulation)
    blocks, x = expansion.blocks, torch.einsum("ok,bkd->bod", expansion.mix, modulation)
    h = F.layer_norm(x, x.shape[-1:]) * blocks.norm_weight + blocks.norm_bias
    return float(((torch.einsum("bsi,sih->bsh", h, blocks.w1) + blocks.b1).abs() > 3).float().mean())


def first_block_attention(model: MBCModel, queries: torch.Tensor, memory: torch.Tensor) -> tuple[float, float]:
    """Mean entropy and mean largest weight of the first aggregation block's attention over what each
    question reads, memory [B or 1, M, dim]."""
    block = model.aggregator.blocks[0]
    keys, _ = block.memory_keys_values(memory)
    query = block.split_heads(block.project_queries(queries))
    weights = (query @ keys.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(-1)
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)
    return float(entropy.mean()), float(weights.max(-1).values.mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="generated")
    parser.add_argument("--questions", type=int, default=24)
    args = parser.parse_args()
    model = MBCModel.from_pretrained(args.checkpoint).eval()
    splits = qa_data.load_splits(args.data)
    rows = splits["validation"][: args.questions]
    right = qa_data.documents(rows)
    unrelated = qa_data.documents(splits["train"])[: len(right)]
    questions = [r.question for r in rows]
    with torch.no_grad():
        vectors = model.amortize(right)
        print(
            f"document vectors: mean norm {vectors.norm(dim=-1).mean():.3f}, "
            f"mean distance from the slot's mean over documents {(vectors - vectors.mean(0)).norm(dim=-1).mean():.3f}"
        )
        if model.quantizer is not None:
            codes = model.compress(right)[..., 0]
            print(
                f"distinct codes per slot over {len(right)} documents: "
                f"{[len(set(codes[:, k].tolist())) for k in range(codes.shape[1])]}"
            )
        memory = model.memory(model.compress(right))
        queries = model.queries(questions)
        keyed = model.retrieval_keys is not None
        right_keys = model.retrieval_keys.keys_of(right) if keyed else None
        with_right, with_other = (reader_over(model, texts).modulation(questions) for texts in (right, unrelated))
        print(
            f"question queries: mean norm {queries.norm(dim=-1).mean():.3f}; "
            f"modulation: mean norm {with_right.norm(dim=-1).mean():.3f}, "
            f"mean distance from its mean over questions {(with_right - with_right.mean(0)).norm(dim=-1).mean():.3f}"
        )
        print(f"prefix blocks: {saturated_share(model, with_right):.0%} of tanh inputs beyond |3| (saturated)")
        if not keyed:
            read = memory[None]
        else:  # each question reads its top-k documents only
            read = memory.view(len(right), model.config.num_slots, -1)[
                model.top_documents(questions, right_keys)
            ].flatten(1, 2)
        entropy, most = first_block_attention(model, queries, read)
        print(
            f"first aggregation block: attention entropy {entropy:.2f} nats (uniform over the {read.shape[1]} "
            f"vectors read: {math.log(read.shape[1]):.2f}), largest weight {most:.3f}"
        )
        print(f"modulation moved by swapping the bank: {(with_right - with_other).norm(dim=-1).mean():.4f}")
        prefix_right, prefix_other = model.prefix(with_right), model.prefix(with_other)
        moved = torch.stack([(a[1] - b[1]).norm(dim=-1).mean() for a, b in zip(prefix_right, prefix_other)]).mean()
        size = torch.stack([a[1].norm(dim=-1).mean() for a in prefix_right]).mean()
        print(f"prefix values: mean norm {size:.3f}, moved by swapping the bank {moved:.5f}")
        same = sum(
            a == b for a, b in zip(model.llm.answer(questions, prefix_right), model.llm.answer(questions, prefix_other))
        )
        print(f"answers unchanged by swapping the bank: {same} of {len(questions)}")


if __name__ == "__main__":
    main()

"""What the frozen LLM reads when a document is in its prompt rather than in a memory: the worked
examples that teach the short-answer format, and the prompt around a context. The token memory
(its kept tokens are such a context) and the evaluation's baselines both use them."""

from __future__ import annotations

import torch

from mbc.network.decoding import DecodingConfig
from mbc.network.lora import lora_disabled

FEW_SHOT_TEMPLATE = (
    "Question: What is the capital of France?\nAnswer: Paris\n\n"
    "Question: In what year did the Second World War end?\nAnswer: 1945\n\n"
    "Question: Who wrote the play Hamlet?\nAnswer: William Shakespeare\n\n"
    "Question: {question}\nAnswer:"
)


CONTEXT_LABEL = "Context:"


def context_prompt(context: str, question: str) -> str:
    """The document(s), then the worked examples that teach the short-answer format, then the question."""
    return f"{CONTEXT_LABEL} {context}\n\n" + FEW_SHOT_TEMPLATE.replace("{question}", question)


def ids_around_context(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """``context_prompt``'s token ids before and after the context, for a context that goes in as
    token ids (or their embeddings) rather than as text."""
    before = tokenizer(CONTEXT_LABEL)["input_ids"]
    after = tokenizer(context_prompt("", question)[len(CONTEXT_LABEL) + 1 :])["input_ids"]
    return before, after


@torch.no_grad()
def answer_prompts(llm, prompts: list[str], decoding: DecodingConfig | None = None) -> list[str]:
    """The base LLM alone (a ``FrozenLLM``: no prefix, KV-LoRA off) continuing whole prompt texts:
    the baselines that put documents into the prompt."""
    with lora_disabled(llm.model):
        return llm.generate([llm.tokenizer(p)["input_ids"] for p in prompts], None, decoding)

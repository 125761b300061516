"""The baselines of the paper's evaluation: the base LLM with no adaptation, and with documents in
its prompt (the gold document: an upper bound; BM25's top-k: retrieval over the raw text)."""

from __future__ import annotations

import torch

from mbc.data import QAExample
from mbc.errors import MBCError
from mbc.evaluation.validation import Evaluation, chunks, scores
from mbc.network.decoding import DecodingConfig
from mbc.network.frozen_llm import FrozenLLM
from mbc.network.lora import lora_disabled
from mbc.prompts import context_prompt


@torch.no_grad()
def answer_without_memory(
    llm: FrozenLLM, questions: list[str], prompt_template: str | None = None, decoding: DecodingConfig | None = None
) -> list[str]:
    """The base LLM alone, asked each question: no prefix, and KV-LoRA switched off."""
    with lora_disabled(llm.model):
        return llm.answer(questions, None, decoding, prompt_template)


@torch.no_grad()
def evaluate_base_llm(
    llm: FrozenLLM,
    examples: list[QAExample],
    prompt_template: str | None = None,
    batch_size: int = 16,
    decoding: DecodingConfig | None = None,
) -> Evaluation:
    """The base LLM with no adaptation: the raw question (``prompt_template=None``: the model's own
    template), or a short-answer prompt such as ``mbc.prompts.FEW_SHOT_TEMPLATE``."""
    predictions = []
    for chunk in chunks(examples, batch_size):
        predictions += answer_without_memory(llm, [e.question for e in chunk], prompt_template, decoding)
    return Evaluation(scores(predictions, examples), predictions)


def llm_window(llm: FrozenLLM) -> int:
    """Tokens the base LLM can attend over (prompt and answer together)."""
    config = llm.model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048


def fitted_context_prompt(llm: FrozenLLM, context: str, question: str, max_tokens: int) -> tuple[str, bool]:
    """``context_prompt`` in at most ``max_tokens`` tokens, the context cut at its end where needed
    (a long document would otherwise take minutes per question, or overflow the window); and whether
    it was cut."""
    prompt = context_prompt(context, question)
    tokenizer = llm.tokenizer
    if len(tokenizer(prompt)["input_ids"]) <= max_tokens:
        return prompt, False
    rest = len(tokenizer(context_prompt("", question))["input_ids"])
    kept = tokenizer(context)["input_ids"][: max(max_tokens - rest - 8, 0)]  # 8: re-tokenizing may merge less
    return context_prompt(tokenizer.decode(kept), question), True


def bm25_retriever(stream: list[str], top_k: int):
    try:
        import bm25s
    except ImportError as error:
        raise MBCError("the BM25 baseline needs the bm25s package: pip install bm25s") from error
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(stream, stopwords="en", show_progress=False), show_progress=False)
    k = min(top_k, len(stream))

    def retrieve(question: str) -> list[str]:
        found, _ = retriever.retrieve(
            bm25s.tokenize([question], stopwords="en", show_progress=False), k=k, show_progress=False
        )
        return [stream[int(i)] for i in found[0]]

    return retrieve

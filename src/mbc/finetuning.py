"""Online fine-tuning: the baselines MAC's and MBC's papers compare their memories with (Hu et al.,
"Meta-Learning Online Adaptation of Language Models", EMNLP 2023).

Nothing is stored per document: the LLM itself changes. Each document of the stream gets
``steps_per_document`` gradient steps of the language-model loss, on one optimizer that runs
through the whole stream, and the questions are then answered closed-book by the updated LLM.

- **Uniform** (``spans="all"``): every token of the document carries the loss.
- **Salient spans** (``spans="salient"``): only the tokens inside salient spans carry it: names
  (runs of capitalised words), numbers and dates. The reference finds entities with a named-entity
  recogniser; no such model installs offline here, so these spans come from the rule set
  ``salient_spans`` below, and the tables name the method "(rules)".

Both start from the same point, the base LLM tuned closed-book on the training split's
question-answer pairs (``qa_tune``, `mbc train-qa`): without it the fine-tuned LLM answers in no
particular format and its EM is the raw question's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mbc.errors import MBCError
from mbc.model import IGNORE, pad
from mbc.network.backbones import load_llm
from mbc.network.decoding import DecodingConfig, FirstLine, generate
from mbc.network.llm_layout import describe_llm
from mbc.settings import Field, settings

QA_TUNING_FILE = "qa_tuning.json"  # marks a folder as a QA-tuned LLM, with how it was made
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"  # MBCConfig's default: the same question for every method


@settings
class FinetuneConfig:
    # chosen on a long validation stream (docs/METHOD.md); a step of 0 would change nothing
    learning_rate: Annotated[float, Field(gt=0)] = 3e-5
    steps_per_document: Annotated[int, Field(ge=1)] = 1  # the reference's: one step per document
    # "all": Uniform; "salient": Salient Spans (rules); "camels": every token, weighted by CaMeLS
    spans: Literal["all", "salient", "camels"] = "all"
    # a longer document is cut into windows of this many, each a step's batch row
    max_document_tokens: Annotated[int, Field(ge=16)] = 512


# ---- salient spans, by rule ------------------------------------------------------------------------
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_NUMBER = r"\d[\d,.:/]*\d|\d"
_DATE = rf"\b(?:{_MONTHS})(?:\s+\d{{1,2}})?(?:,?\s+\d{{3,4}})?\b"
_NAME = r"\b[A-Z][\w'’-]*(?:\s+(?:of|the|de|van|von|del|da|la)?\s*[A-Z][\w'’-]*)*"
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\"“(]\s*)$")


def salient_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of names, numbers and dates in ``text``. A lone capitalised word that opens
    a sentence is taken for an ordinary word ("The", "In"), unless the rest of its run is a name."""
    spans = [m.span() for m in re.finditer(_DATE, text)] + [m.span() for m in re.finditer(_NUMBER, text)]
    for match in re.finditer(_NAME, text):
        words = match.group().split()
        opens_sentence = _SENTENCE_START.search(text[: match.start()]) is not None
        if opens_sentence and len(words) == 1:
            continue
        start = match.start() if not opens_sentence else match.start() + len(words[0]) + 1
        spans.append((start, match.end()))
    return sorted(spans)


def salient_token_mask(text: str, offsets: list[tuple[int, int]]) -> list[bool]:
    """For each token (its character offsets), whether it overlaps a salient span."""
    spans = salient_spans(text)
    return [any(start < end_span and start_span < end for start_span, end_span in spans) for start, end in offsets]


def check_qa_tuned(folder: str | Path) -> Path:
    """``folder`` if `mbc train-qa` wrote it, else one line saying how to make one."""
    if not (Path(folder) / QA_TUNING_FILE).is_file():
        raise MBCError(
            f"{folder} is not a QA-tuned LLM (no {QA_TUNING_FILE}): make one with `mbc train-qa --output {folder}`"
        )
    return Path(folder)


# ---- the LLM that fine-tuning changes ---------------------------------------------------------------
class ClosedBookLLM:
    """A causal LM with its tokenizer that answers questions with nothing in its prompt but the question."""

    def __init__(self, llm, tokenizer):
        self.llm, self.tokenizer = llm, tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.layout = describe_llm(llm)
        self._first_line = FirstLine(tokenizer, llm.get_output_embeddings().weight.shape[0])

    @classmethod
    def load(cls, name: str | Path) -> "ClosedBookLLM":
        backbone = load_llm(str(name))
        return cls(backbone.model, backbone.tokenizer)

    @classmethod
    def load_qa_tuned(cls, folder: str | Path) -> "ClosedBookLLM":
        """A folder `mbc train-qa` wrote; anything else is refused in one line."""
        return cls.load(check_qa_tuned(folder))

    def save(self, folder: str | Path, notes: dict) -> None:
        folder = Path(folder)
        self.llm.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / QA_TUNING_FILE).write_text(json.dumps(notes, indent=2))

    def training_row(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        prompt = self.tokenizer(PROMPT_TEMPLATE.format(question=question))["input_ids"]
        target = self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
        target = target + [self.tokenizer.eos_token_id]
        return prompt + target, [IGNORE] * len(prompt) + target

    def logits(self, rows: list[tuple], parameters: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM's logits on the padded ids of ``rows`` and their attention mask; ``parameters``
        (by name) stand in for the LLM's own where given, as CaMeLS's inner step needs."""
        ids = pad([r[0] for r in rows], self.tokenizer.pad_token_id)
        mask = pad([[1] * len(r[0]) for r in rows], 0)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if parameters is None:
            return self.llm(**inputs).logits, mask
        return torch.func.functional_call(self.llm, parameters, (), inputs, strict=False).logits, mask

    def loss(self, rows: list[tuple], weights: torch.Tensor | None = None, parameters: dict | None = None):
        """Mean next-token cross-entropy over the labelled tokens of ``rows`` (ids, labels); with
        ``weights`` (one per token of each padded row, as CaMeLS gives them) each token's term is
        scaled by its weight, and the mean stays over the labelled tokens."""
        labels = pad([r[1] for r in rows], IGNORE)[:, 1:]
        logits = self.logits(rows, parameters)[0][:, :-1]
        if weights is None:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        return (per_token * weights[:, 1:]).sum() / (labels != IGNORE).sum().clamp(min=1)

    def document_rows(self, document: str, size: int) -> tuple[list[tuple[list[int], list[int]]], list]:
        """The document as windows of at most ``size`` tokens (ids, labels on every token), and each
        token's character offsets."""
        encoded = self.tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        return [(ids[i : i + size], ids[i : i + size]) for i in range(0, len(ids), size)], offsets

    @torch.no_grad()
    def answer(self, questions: list[str], decoding: DecodingConfig | None = None) -> list[str]:
        decoding = decoding or DecodingConfig()
        prompts = [self.tokenizer(PROMPT_TEMPLATE.format(question=q))["input_ids"] for q in questions]
        ids = pad(prompts, self.tokenizer.pad_token_id, side="left")
        mask = pad([[1] * len(p) for p in prompts], 0, side="left")
        self.llm.eval()
        tokens = generate(
            self.llm, self.layout, ids, mask, None, self.tokenizer.eos_token_id, decoding, self._first_line
        )
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip().split("\n")[0].strip() for t in tokens]


def qa_tune(model: ClosedBookLLM, pairs: list[tuple[str, str]], steps: int, learning_rate: float, batch_size: int = 16):
    """Teach the answer format closed-book: ``steps`` AdamW steps on (question, answer) pairs, in
    order, round and round; returns the loss of each step."""
    if not pairs:
        raise MBCError("QA tuning needs question-answer pairs: the training split has none")
    optimizer = torch.optim.AdamW(model.llm.parameters(), lr=learning_rate, weight_decay=0.0)
    model.llm.train()
    losses = []
    for step in tqdm(range(steps), desc="QA tuning", unit="step"):
        batch = [pairs[(step * batch_size + i) % len(pairs)] for i in range(batch_size)]
        loss = model.loss([model.training_row(q, a) for q, a in batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.llm.eval()
    return losses


class OnlineFinetuning:
    """The stream's documents, one after another, into the LLM's weights. ``weigher`` (CaMeLS,
    camels.py): a model giving each token of a document the weight of its loss term."""

    def __init__(self, model: ClosedBookLLM, config: FinetuneConfig, weigher=None):
        if (config.spans == "camels") != (weigher is not None):
            raise MBCError("CaMeLS fine-tuning needs its weighting model (`mbc train-camels`), and only it takes one")
        self.model, self.config, self.weigher = model, config, weigher
        # fused: the same AdamW update in one kernel; on 2 CPU cores its step takes 0.07 s instead of
        # 0.28 s for the 135 M weights, a quarter of a document's four steps (docs/JOURNAL.md, session 29)
        self.optimizer = torch.optim.AdamW(
            model.llm.parameters(), lr=config.learning_rate, weight_decay=0.0, fused=True
        )
        self.skipped = 0  # salient spans: documents with none, which get no step

    def rows(self, document: str) -> list[tuple[list[int], list[int]]]:
        """The document as (ids, labels) windows; labels IGNORE on tokens that carry no loss."""
        size = self.config.max_document_tokens
        windows, offsets = self.model.document_rows(document, size)
        if self.config.spans == "salient":
            keep = salient_token_mask(document, offsets)
            windows = [
                (ids, [token if kept else IGNORE for token, kept in zip(ids, keep[i * size :])])
                for i, (ids, _) in enumerate(windows)
            ]
        return [(ids, labels) for ids, labels in windows if any(x != IGNORE for x in labels[1:])]

    def adapt(self, document: str) -> None:
        rows = self.rows(document)
        if not rows:
            self.skipped += 1
            return
        weights = None
        if self.weigher is not None:
            with torch.no_grad():
                weights = self.weigher.weights([ids for ids, _ in rows])
        self.model.llm.train()
        with torch.enable_grad():  # evaluation runs under no_grad; these steps are training
            for _ in range(self.config.steps_per_document):
                loss = self.model.loss(rows, weights)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
        self.model.llm.eval()

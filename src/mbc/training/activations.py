"""Frozen work done once: what a training step would otherwise recompute every epoch.

``FrozenActivations`` keeps, computed the first time training meets a row or a text and reused in
every later epoch:
- per training row (prompt + answer tokens), the hidden state the frozen LLM brings to its first
  layer with a prefix or KV-LoRA (network/frozen_llm.py); only the adapted layers then run;
- per document, with ``code_pointer``, the hidden states the pointer keys its tokens by, where no
  KV-LoRA lies below ``pointer_layer`` (network/pointer.py);
- per document and per question, with ``encoder_trained_layers`` set, the hidden state the
  encoder's frozen lower layers bring to its first trained one (network/amortization.py).
Each depends on its tokens alone (frozen weights, no dropout), so each is keyed by them. Where
nothing lies below (a prefix in every LLM layer, as in the paper's presets; an encoder trained
whole or a T5 encoder), that part is off and the step computes as without it.

``FrozenStore`` holds what is kept, by part and by what the part depends on (backbone, layers
below the split, dtype), so that trainings of different adapters over the same frozen backbones
share it: the main job trains MBC and then MAC on the same rows, and MAC computes none of it again.
"""

from __future__ import annotations

import torch

from mbc.model import MBCModel
from mbc.network.frozen_llm import pad


class _RowCache:
    """Token ids -> a frozen part's hidden state [T, d] for them, computed in batches of what is missing."""

    def __init__(self):
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}

    def padded(self, keys: list[tuple[int, ...]], device, compute) -> torch.Tensor:
        """The hidden states of ``keys``, right-padded with zeros (padding is never attended to) [B, T, d];
        ``compute(ids, mask)`` makes those not kept yet."""
        missing = [k for k in dict.fromkeys(keys) if k not in self.rows]
        if missing:
            ids = pad([list(k) for k in missing], 0).to(device)
            hidden = compute(ids, _mask(missing).to(device))
            for i, key in enumerate(missing):
                self.rows[key] = hidden[i, : len(key)].clone()
        rows = [self.rows[k] for k in keys]
        out = rows[0].new_zeros(len(rows), max(len(r) for r in rows), rows[0].shape[-1])
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    @property
    def bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.rows.values())


class FrozenStore:
    """What frozen parts made of rows and texts, by the part's signature: the backbone it runs,
    how many of its layers, and in which dtype. Models whose signatures agree share the rows."""

    def __init__(self):
        self._parts: dict[tuple, _RowCache] = {}

    def part(self, *signature) -> _RowCache:
        return self._parts.setdefault(signature, _RowCache())


def _dtype(module) -> str:
    return str(next(module.parameters()).dtype)


def _mask(keys: list[tuple[int, ...]]) -> torch.Tensor:
    return pad([[1] * len(k) for k in keys], 0)


def _token_keys(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row's real tokens, wherever the tokenizer put its padding."""
    return [tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)]


class FrozenActivations:
    def __init__(self, model: MBCModel, store: FrozenStore | None = None):
        """``store``: where the kept rows live; pass one store to several trainings to share them."""
        self.model, store = model, store or FrozenStore()
        config, amortization, question_network = model.config, model.amortization, model.question_network
        self.llm = self.documents = self.questions = self.pointer = None
        if model.llm.first_adapted_layer > 0:
            llm = (config.llm, config.llm_quantization, model.llm.first_adapted_layer, _dtype(model.llm.model))
            self.llm = store.part("llm", *llm)
        if model.pointer is not None and config.pointer_layer <= model.llm.first_adapted_layer:
            pointer = (config.llm, config.llm_quantization, config.pointer_layer, _dtype(model.llm.model))
            self.pointer = store.part("pointer", *pointer)
        if amortization.splits:
            encoder = (config.document_encoder, amortization.frozen_layers, _dtype(amortization.encoder))
            self.documents = store.part("documents", *encoder)
        if question_network.splits:
            encoder = (config.question_encoder, question_network.frozen_layers, _dtype(question_network.encoder))
            self.questions = store.part("questions", *encoder)

    @property
    def enabled(self) -> bool:
        return any(part is not None for part in (self.llm, self.documents, self.questions, self.pointer))

    def sizes(self) -> dict[str, tuple[int, int]]:
        """Per part: (rows kept, bytes)."""
        parts = {"llm": self.llm, "documents": self.documents, "questions": self.questions}
        return {name: (len(part.rows), part.bytes) for name, part in parts.items() if part is not None}

    def qa_loss(self, questions: list[str], answers: list[str], prefix) -> torch.Tensor:
        """``model.llm.qa_loss``, running only the LLM layers that carry a prefix or KV-LoRA."""
        if self.llm is None:
            return self.model.llm.qa_loss(questions, answers, prefix)
        llm = self.model.llm
        ids, mask, labels = llm.training_inputs(questions, answers)  # right-padded, as ``padded`` pads
        lower = self.llm.padded(_token_keys(ids, mask), ids.device, llm.lower_hidden)
        return llm.qa_loss_from_lower(lower, mask, labels, prefix)

    def amortize(self, documents: list[str], states=None) -> torch.Tensor:
        """``model.amortize``, running only the encoder's trained layers (and the pointer's LLM layers
        once a document)."""
        model = self.model
        if self.documents is None:
            slots = model.amortization(*model.document_tokens(documents))
        else:
            slots = _from_lower(model.amortization, self.documents, model.document_tokens(documents))
        if model.pointer is not None and states is None:
            states = self.pointer_states(documents)
        return model.point(slots, states)

    def pointer_states(self, documents: list[str]):
        """``model.pointer_states``, its hidden states kept."""
        if self.pointer is None:
            return self.model.pointer_states(documents)
        kept = self.pointer

        def lower(ids, mask):
            return kept.padded(_token_keys(ids, mask), ids.device, self.model.pointer_hidden)

        return self.model.pointer_states(documents, lower)

    def queries(self, questions: list[str]) -> torch.Tensor:
        """``model.queries``, running only the question encoder's trained layers."""
        if self.questions is None:
            return self.model.queries(questions)
        return _from_lower(self.model.question_network, self.questions, self.model.question_tokens(questions))


def _from_lower(network, cache: _RowCache, tokens) -> torch.Tensor:
    """``network`` (an encoder with its reader) on ``tokens``, its frozen lower layers' output kept in ``cache``."""
    keys = _token_keys(*tokens)
    lower = cache.padded(keys, tokens[0].device, network.lower)
    return network.forward_from_lower(lower, _mask(keys).to(lower.device))

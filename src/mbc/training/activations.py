"""Frozen work done once: what a training step would otherwise recompute every epoch.

``LowerLayerCache`` keeps, per training row, the hidden state the frozen LLM brings to its first
layer with a prefix or KV-LoRA (network/frozen_llm.py). It depends on the row's tokens alone, so
it is keyed by them: computed the first time a row is trained on, in the same step, and reused in
every later epoch, when only the adapted layers run. Where every layer is adapted (the paper's
presets: a prefix in each layer) there is nothing below to keep, and the cache is off.
"""

from __future__ import annotations

import torch

from mbc.model import IGNORE, MBCModel, pad


class LowerLayerCache:
    def __init__(self, model: MBCModel):
        self.model = model
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}  # token ids -> hidden [T, d]

    @property
    def enabled(self) -> bool:
        return self.model.first_adapted_layer > 0

    @property
    def bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.rows.values())

    def inputs(self, questions: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``model.qa_loss_from_lower``: the rows' lower hidden states [B, T, d], right-padded with
        zeros (padding is never attended to), their attention mask and labels."""
        rows = [self.model.training_row(q, a) for q, a in zip(questions, answers)]
        keys = [tuple(ids) for ids, _ in rows]
        self._compute([k for k in dict.fromkeys(keys) if k not in self.rows])
        hidden = [self.rows[k] for k in keys]
        width = max(len(k) for k in keys)
        lower = hidden[0].new_zeros(len(keys), width, hidden[0].shape[-1])
        for i, h in enumerate(hidden):
            lower[i, : len(h)] = h
        mask = pad([[1] * len(k) for k in keys], 0)
        labels = pad([label for _, label in rows], IGNORE)
        return lower, mask.to(lower.device), labels.to(lower.device)

    def _compute(self, missing: list[tuple[int, ...]]) -> None:
        if not missing:
            return
        device = self.model.device
        ids = pad([list(k) for k in missing], self.model.tokenizer.pad_token_id).to(device)
        mask = pad([[1] * len(k) for k in missing], 0).to(device)
        hidden = self.model.lower_hidden(ids, mask)
        for i, key in enumerate(missing):
            self.rows[key] = hidden[i, : len(key)].clone()

"""The frozen base LLM run in two parts, split at the first layer that carries a prefix or KV-LoRA.

Below that layer nothing trains and nothing of the memory enters, so the hidden state a training
row (prompt + answer) brings to it depends on the tokens alone: training may compute it once and
keep it (training/activations.py). ``lower_hidden`` runs the embeddings and the layers below;
``upper_hidden`` the rest and the final norm. Together they compute what ``llm.base_model`` does,
with the same mask and positions (tests/test_frozen_llm.py checks loss and gradients).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from mbc.network.llm_layout import LLMLayout


def first_adapted_layer(layout: LLMLayout, prefix_layers: int, lora_layers: int) -> int:
    """Index of the lowest layer with a prefix or KV-LoRA (0: every layer has one, nothing is frozen below)."""
    return layout.num_layers - max(prefix_layers, lora_layers)


def _base(llm: nn.Module) -> nn.Module:
    return llm.base_model


def _layers(llm: nn.Module, layout: LLMLayout) -> nn.ModuleList:
    return _base(llm).h if layout.family == "gpt2" else _base(llm).layers


def _run(llm: nn.Module, layout: LLMLayout, hidden: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
    base = _base(llm)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    causal = create_causal_mask(
        config=base.config, inputs_embeds=hidden, attention_mask=mask, cache=None, position_ids=positions
    )
    if layout.family == "gpt2":
        for block in layers:
            hidden = block(hidden, None, causal, position_ids=positions)
        return hidden
    rotary = base.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=causal, position_embeddings=rotary, position_ids=positions)
    return hidden


def lower_hidden(llm: nn.Module, layout: LLMLayout, ids: torch.Tensor, mask: torch.Tensor, stop: int) -> torch.Tensor:
    """Token ids [B, T] -> the hidden state [B, T, d] entering layer ``stop``."""
    base = _base(llm)
    if layout.family == "gpt2":
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        hidden = base.drop(base.wte(ids) + base.wpe(positions))
    else:
        hidden = base.embed_tokens(ids)
    return _run(llm, layout, hidden, mask, _layers(llm, layout)[:stop])


def upper_hidden(
    llm: nn.Module, layout: LLMLayout, hidden: torch.Tensor, mask: torch.Tensor, start: int
) -> torch.Tensor:
    """The hidden state entering layer ``start`` [B, T, d] -> the last hidden state (final norm applied)."""
    hidden = _run(llm, layout, hidden, mask, _layers(llm, layout)[start:])
    return _base(llm).ln_f(hidden) if layout.family == "gpt2" else _base(llm).norm(hidden)

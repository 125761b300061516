"""KV-LoRA: low-rank adapters on the key and value projections of the last attention layers.

Only keys and values are adapted (never queries): the point is to let the frozen LLM learn to read
the soft prefixes, which enter attention as keys and values. ``B`` starts at zero, so a fresh
adapter leaves the base model's outputs unchanged. Naming follows PEFT (``lora_A``, ``lora_B``,
``r``, ``lora_alpha``, ``lora_dropout``) so the layers read as users expect.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from mbc.network.llm_layout import LLMLayout


class LoRAAdapter(nn.Module):
    """delta(x) = B(A(dropout(x))) * alpha / r."""

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout = nn.Dropout(lora_dropout)
        self.scaling = lora_alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class LoRALinear(nn.Module):
    """A frozen projection (Llama's k_proj or v_proj) plus one adapter."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float):
        super().__init__()
        self.base = base
        self.adapter = LoRAAdapter(base.in_features, base.out_features, r, lora_alpha, lora_dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + self.adapter(x) if self.enabled else out


class FusedKVLoRA(nn.Module):
    """GPT-2's fused ``c_attn`` (output = [q | k | v]) with adapters on the k and v slices only."""

    def __init__(self, base: nn.Module, hidden_size: int, r: int, lora_alpha: float, lora_dropout: float):
        super().__init__()
        self.base = base
        self.hidden_size = hidden_size
        self.adapter_k = LoRAAdapter(hidden_size, hidden_size, r, lora_alpha, lora_dropout)
        self.adapter_v = LoRAAdapter(hidden_size, hidden_size, r, lora_alpha, lora_dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        q, k, v = out.split(self.hidden_size, dim=-1)
        return torch.cat([q, k + self.adapter_k(x), v + self.adapter_v(x)], dim=-1)


def add_kv_lora(layout: LLMLayout, num_layers: int, r: int, lora_alpha: float, lora_dropout: float) -> list[nn.Module]:
    """Wrap the key/value projections of the last ``num_layers`` layers in place; returns the wrappers."""
    wrappers = []
    for attention in layout.attentions[layout.num_layers - num_layers :]:
        if layout.family == "gpt2":
            attention.c_attn = FusedKVLoRA(attention.c_attn, layout.hidden_size, r, lora_alpha, lora_dropout)
            wrappers.append(attention.c_attn)
        else:
            attention.k_proj = LoRALinear(attention.k_proj, r, lora_alpha, lora_dropout)
            attention.v_proj = LoRALinear(attention.v_proj, r, lora_alpha, lora_dropout)
            wrappers += [attention.k_proj, attention.v_proj]
    return wrappers


def lora_wrappers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (LoRALinear, FusedKVLoRA))]


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base LLM exactly as it was before any adapter was added."""
    wrappers = lora_wrappers(model)
    previous = [w.enabled for w in wrappers]
    for w in wrappers:
        w.enabled = False
    try:
        yield
    finally:
        for w, flag in zip(wrappers, previous):
            w.enabled = flag

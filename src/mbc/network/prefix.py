"""Modulation -> soft prefix (P-tuning v2), and how the frozen LLM attends to it.

``PrefixExpansion`` turns the K aggregated vectors into P past keys and P past values for each
prefixed layer, shaped for the model's key/value heads (so grouped-query Llama models get
``num_key_value_heads`` heads, not ``num_attention_heads``).

The prefix enters the LLM through a registered attention function (transformers'
``AttentionInterface``): in a prefixed layer, the prefix keys and values are put in front of the
layer's own keys and values and every query may attend to them (the mask gains P visible columns).
Doing it inside attention rather than through ``past_key_values`` lets only the last layers carry
a prefix (a KV cache needs the same length in every layer), keeps the prefix out of the KV cache
during generation, and leaves layers without a prefix on transformers' own SDPA path untouched,
bit for bit. One difference from a prefix passed as past keys/values: the question's position ids
start at 0 rather than at P (the prefix occupies no positions).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mbc.network.layers import SlotMLP
from mbc.network.llm_layout import LLMLayout

ATTENTION = "mbc_prefix"


def _causal_mask(batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    # The last q_len keys are the queries themselves; earlier keys are the cache.
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return (torch.arange(kv_len, device=device)[None, :] <= rows).expand(batch, 1, q_len, kv_len)


def _prepend_visible(mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, prefix_len: int, device):
    if mask is None:
        mask = _causal_mask(batch, q_len, kv_len, device)
    mask = mask.expand(batch, -1, q_len, kv_len)
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros  # bool: True attends; float: additive 0
    prefix_cols = visible(batch, mask.shape[1], q_len, prefix_len, dtype=mask.dtype, device=device)
    return torch.cat([prefix_cols, mask], dim=-1)


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    prefix = getattr(module, "mbc_prefix", None)
    if prefix is not None:
        prefix_key, prefix_value = prefix
        batch, _, q_len, _ = query.shape
        attention_mask = _prepend_visible(attention_mask, batch, q_len, key.shape[2], prefix_key.shape[2], query.device)
        key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
        value = torch.cat([prefix_value.to(value.dtype), value], dim=2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, prefix_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def enable_prefix_attention(llm: nn.Module) -> None:
    llm.set_attn_implementation(ATTENTION)


@contextmanager
def prefix_in(layout: LLMLayout, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None):
    """While inside, the last len(prefix) layers attend to prefix[i] = (keys, values), each
    [batch, kv_heads, P, head_dim]. ``None`` or an empty list means no prefix."""
    prefix = prefix or []
    layers = layout.attentions[layout.num_layers - len(prefix) :] if prefix else []
    for attention, pair in zip(layers, prefix):
        attention.mbc_prefix = pair
    try:
        yield
    finally:
        for attention in layers:
            attention.mbc_prefix = None


def keep_prefix_rows(layout: LLMLayout, rows: torch.Tensor) -> None:
    """Inside ``prefix_in``: keep only ``rows`` of every prefixed layer's prefix (greedy decoding
    drops the rows that have finished)."""
    for attention in layout.attentions:
        if getattr(attention, "mbc_prefix", None) is not None:
            keys, values = attention.mbc_prefix
            attention.mbc_prefix = (keys[rows], values[rows])


def repeat_prefix(prefix: list[tuple[torch.Tensor, torch.Tensor]], times: int):
    """Each question's prefix repeated for each of its beams (batch b -> rows b*times .. b*times+times-1)."""
    return [(k.repeat_interleave(times, dim=0), v.repeat_interleave(times, dim=0)) for k, v in prefix]


class PrefixExpansion(nn.Module):
    """K modulation vectors -> (keys, values) of P tokens for each of the last ``num_layers`` layers.

    Each of the ``num_layers * 2 * P`` output vectors has its own feed-forward block. The method
    does not say how K inputs feed P*L*2 blocks; here each block reads a learned mix of the K
    vectors, initialised so that block s reads vector s mod K.
    """

    def __init__(
        self,
        num_slots: int,
        dim: int,
        prefix_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        hidden_dim: int,
    ):
        super().__init__()
        self.prefix_tokens, self.num_layers = prefix_tokens, num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        outputs = num_layers * 2 * prefix_tokens
        self.mix = nn.Parameter(torch.eye(num_slots)[torch.arange(outputs) % num_slots])
        self.blocks = SlotMLP(outputs, dim, hidden_dim, num_kv_heads * head_dim, skip=False)
        # Zero prefix keys and values at the start (as LoRA's B = 0): training begins from a prefix
        # that only dilutes attention slightly, not from random keys that derail the frozen LLM.
        nn.init.zeros_(self.blocks.w2)
        nn.init.zeros_(self.blocks.b2)

    def forward(self, modulation: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = modulation.shape[0]
        vectors = self.blocks(torch.einsum("ok,bkd->bod", self.mix, modulation))
        # [B, layers, key/value, P, kv_heads, head_dim] -> per layer [B, kv_heads, P, head_dim]
        vectors = vectors.view(batch, self.num_layers, 2, self.prefix_tokens, self.num_kv_heads, self.head_dim)
        vectors = vectors.permute(1, 2, 0, 4, 3, 5)
        return [(layer[0], layer[1]) for layer in vectors]

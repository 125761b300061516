"""Two building blocks shared by the networks: per-slot MLPs and pre-LayerNorm cross-attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    # nn.Linear's default initialisation, for weights stored as batched tensors.
    bound = 1 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class SlotMLP(nn.Module):
    """One small MLP per slot, all slots evaluated in one batched einsum.

    Slot s maps x[:, s] through LayerNorm -> Linear -> Tanh -> Linear, plus (if ``skip``) a linear
    skip projection of its input: the per-slot MLP of the paper's amortization and question
    networks. Without the skip it is the per-slot feed-forward block of the prefix expansion.
    """

    def __init__(self, num_slots: int, in_dim: int, hidden_dim: int, out_dim: int, skip: bool = True):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(num_slots, in_dim))
        self.norm_bias = nn.Parameter(torch.zeros(num_slots, in_dim))
        self.w1 = _uniform(num_slots, in_dim, hidden_dim, fan_in=in_dim)
        self.b1 = _uniform(num_slots, hidden_dim, fan_in=in_dim)
        self.w2 = _uniform(num_slots, hidden_dim, out_dim, fan_in=hidden_dim)
        self.b2 = _uniform(num_slots, out_dim, fan_in=hidden_dim)
        self.skip = _uniform(num_slots, in_dim, out_dim, fan_in=in_dim) if skip else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, slots, in_dim] -> [batch, slots, out_dim]."""
        h = F.layer_norm(x, x.shape[-1:]) * self.norm_weight + self.norm_bias
        h = torch.tanh(torch.einsum("bsi,sih->bsh", h, self.w1) + self.b1)
        out = torch.einsum("bsh,sho->bso", h, self.w2) + self.b2
        if self.skip is not None:
            out = out + torch.einsum("bsi,sio->bso", x, self.skip)
        return out


class CrossAttentionBlock(nn.Module):
    """Queries attend over a memory, then a feed-forward layer; both pre-LayerNorm and residual.

    ``memory_log_weight`` adds log(w_m) to the attention logit of memory entry m. With w_m the
    number of times a codebook entry occurs in a bank, attention over the C codes equals attention
    over the whole bank (see MBC-METHOD.md, "An observation about the compressed bank").
    """

    def __init__(self, dim: int, heads: int, head_dim: int, memory_dim: int | None = None, ffn_dim: int | None = None):
        super().__init__()
        memory_dim = memory_dim or dim
        inner = heads * head_dim
        self.heads = heads
        self.norm_query = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(memory_dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(memory_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim or dim), nn.GELU(), nn.Linear(ffn_dim or dim, dim))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def memory_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a memory [batch, M, memory_dim], each [batch, heads, M, head_dim]."""
        key, value = self.to_kv(self.norm_memory(memory)).chunk(2, dim=-1)
        return self._split_heads(key), self._split_heads(value)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        memory_log_weight: torch.Tensor | None = None,
        keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: [B, Q, dim]; memory: [B or 1, M, memory_dim]; mask (True = attend) / log weight: [B or 1, M].
        ``keys_values``: this block's ``memory_keys_values(memory)``, computed once for many questions."""
        key, value = keys_values if keys_values is not None else self.memory_keys_values(memory)
        batch = x.shape[0]
        key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
        bias = None
        if memory_mask is not None:
            bias = torch.zeros(memory_mask.shape, dtype=x.dtype, device=x.device).masked_fill(~memory_mask, float("-inf"))
        if memory_log_weight is not None:
            bias = memory_log_weight.to(x.dtype) if bias is None else bias + memory_log_weight
        if bias is not None:
            bias = bias[:, None, None, :].expand(batch, -1, -1, -1)
        query = self._split_heads(self.to_q(self.norm_query(x)))
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        self.last_read = self.to_out(attended.transpose(1, 2).flatten(-2))  # what this block took from the memory
        x = x + self.last_read
        return x + self.ffn(self.norm_ffn(x))

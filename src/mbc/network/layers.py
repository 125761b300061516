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
    over the whole bank (docs/METHOD.md, "Reading a compressed bank").
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

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, n, heads * head_dim] -> [batch, heads, n, head_dim]."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def project_queries(self, x: torch.Tensor) -> torch.Tensor:
        """The attention queries of x [B, Q, dim], heads not yet split: [B, Q, heads * head_dim]."""
        return self.to_q(self.norm_query(x))

    def memory_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a memory [batch, M, memory_dim], each [batch, heads, M, head_dim]."""
        key, value = self.to_kv(self.norm_memory(memory)).chunk(2, dim=-1)
        return self.split_heads(key), self.split_heads(value)

    def read(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None = None,
        memory_log_weight: torch.Tensor | None = None,
        keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """What the queries x [B, Q, dim] take from the memory [B or 1, M, memory_dim]: [B, Q, dim].
        mask (True = attend) / log weight: [B or 1, M]. ``keys_values``: this block's
        ``memory_keys_values(memory)``, computed once for many questions."""
        key, value = keys_values if keys_values is not None else self.memory_keys_values(memory)
        batch = x.shape[0]
        key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
        bias = None
        if memory_mask is not None:
            bias = torch.zeros(memory_mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~memory_mask, float("-inf")
            )
        if memory_log_weight is not None:
            bias = memory_log_weight.to(x.dtype) if bias is None else bias + memory_log_weight
        if bias is not None:
            bias = bias[:, None, None, :].expand(batch, -1, -1, -1)
        query = self.split_heads(self.project_queries(x))
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        return self.to_out(attended.transpose(1, 2).flatten(-2))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm_ffn(x))

    def forward(self, x, memory, memory_mask=None, memory_log_weight=None, keys_values=None) -> torch.Tensor:
        """x + what it reads from the memory, then the feed-forward layer (arguments as ``read``)."""
        return self.feed_forward(x + self.read(x, memory, memory_mask, memory_log_weight, keys_values))

"""The aggregation network: K question queries attend over every vector of the memory bank."""

from __future__ import annotations

import torch
from torch import nn

from .layers import CrossAttentionBlock


class Aggregator(nn.Module):
    """A stack of cross-attention blocks (paper: 4 blocks, 8 heads of width 96, FFN width = dim).

    Every block attends over the same memory, which holds no position or document information:
    the bank is a set of vectors, so the output does not depend on their order.
    """

    def __init__(self, dim: int, num_blocks: int = 4, heads: int = 8, head_dim: int = 96):
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads, head_dim) for _ in range(num_blocks))

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        memory_log_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """queries [B, K, dim], memory [B or 1, M, dim] -> modulation [B, K, dim]."""
        x = queries
        for block in self.blocks:
            x = block(x, memory, memory_mask, memory_log_weight)
        return x

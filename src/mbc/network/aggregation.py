"""The aggregation network: K question queries attend over every vector of the memory bank."""

from __future__ import annotations

import torch
from torch import nn

from mbc.network.layers import CrossAttentionBlock


class Aggregator(nn.Module):
    """A stack of cross-attention blocks (paper: 4 blocks, 8 heads of width 96, FFN width = dim).

    Every block attends over the same memory, which holds no position or document information:
    the bank is a set of vectors, so the output does not depend on their order.
    """

    def __init__(self, dim: int, num_blocks: int = 4, heads: int = 8, head_dim: int = 96, output: str = "residual"):
        super().__init__()
        if output not in ("residual", "reads"):
            raise ValueError(f"aggregator output must be 'residual' or 'reads', got {output!r}")
        self.output = output
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads, head_dim) for _ in range(num_blocks))

    def preselection_keys(self, vectors: torch.Tensor) -> torch.Tensor:
        """Vectors [N, dim] (e.g. each document's mean) -> the first block's attention keys of them,
        heads side by side [N, heads * head_dim]: a cheap score of what a question would read."""
        key, _ = self.blocks[0].memory_keys_values(vectors[None])
        return key[0].transpose(0, 1).flatten(1)

    def preselection_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries [B, K, dim] -> the first block's attention queries, averaged over the K: [B, heads * head_dim]."""
        return self.blocks[0].project_queries(queries).mean(1)

    def keys_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's keys and values of a memory [1, M, dim]."""
        return [block.memory_keys_values(memory) for block in self.blocks]

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        memory_log_weight: torch.Tensor | None = None,
        memory_keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """queries [B, K, dim], memory [B or 1, M, dim] -> modulation [B, K, dim].
        ``memory_keys_values`` (from ``keys_values(memory)``) stands in for ``memory``: a bank that
        many questions read is projected once, not once per question."""
        x, reads = queries, 0
        cached = memory_keys_values or [None] * len(self.blocks)
        for block, keys_values in zip(self.blocks, cached):
            read = block.read(x, memory, memory_mask, memory_log_weight, keys_values)
            x = block.feed_forward(x + read)
            reads = reads + read
        # "residual" (the paper): the final residual stream, question queries included.
        # "reads": only what the blocks read from the memory (the queries and feed-forward layers
        # still steer each read); the question's own contribution is left to KV-LoRA, which sees
        # the question tokens anyway, so the prefix can only carry memory.
        return x if self.output == "residual" else reads

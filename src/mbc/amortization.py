"""The amortization network: a text -> K context vectors of the base LLM's width.

An encoder reads the text; K learned query tokens read the encoder's output; one small MLP per
query slot maps each of the K results to the LLM's hidden size. With an encoder-decoder backbone
(T5, the reference's choice) the K queries are the decoder's input embeddings, as in the
reference. An encoder-only backbone (BERT family, e.g. the bundled all-MiniLM-L6-v2) has no
decoder, so the queries read it through a few cross-attention blocks instead.

The question network of the paper has the same shape (question -> K query vectors), so it is a
second instance of this class over the question encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import CrossAttentionBlock, SlotMLP


def encoder_width(encoder: nn.Module) -> int:
    config = encoder.config
    return getattr(config, "d_model", None) or config.hidden_size


class AmortizationNetwork(nn.Module):
    def __init__(self, encoder: nn.Module, num_slots: int, out_dim: int, reader_blocks: int = 2, train_encoder: bool = True):
        super().__init__()
        self.encoder = encoder
        if getattr(encoder, "pooler", None) is not None:
            # BERT's pooled output is never used: dropping the pooler keeps every remaining
            # parameter in the loss, which distributed training requires.
            encoder.pooler = None
        self.encoder.requires_grad_(train_encoder)
        width = encoder_width(encoder)
        self.queries = nn.Parameter(torch.randn(num_slots, width) * 0.02)
        self.is_encoder_decoder = bool(getattr(encoder.config, "is_encoder_decoder", False))
        if self.is_encoder_decoder:
            self.reader = None
        else:
            heads = encoder.config.num_attention_heads
            self.reader = nn.ModuleList(
                CrossAttentionBlock(width, heads, width // heads, ffn_dim=4 * width) for _ in range(reader_blocks)
            )
        self.slot_mlp = SlotMLP(num_slots, width, out_dim, out_dim, skip=True)

    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The K query slots after reading the text: [batch, K, encoder width]."""
        queries = self.queries.expand(input_ids.shape[0], -1, -1)
        if self.is_encoder_decoder:
            encoded = self.encoder.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.encoder.decoder(
                inputs_embeds=queries, encoder_hidden_states=encoded, encoder_attention_mask=attention_mask
            ).last_hidden_state
        encoded = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        slots, mask = queries, attention_mask.bool()
        for block in self.reader:
            slots = block(slots, encoded, memory_mask=mask)
        return slots

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, T] -> context vectors [batch, K, out_dim]."""
        return self.slot_mlp(self.read(input_ids, attention_mask))

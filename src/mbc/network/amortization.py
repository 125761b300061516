"""The amortization network: a text -> K context vectors of the base LLM's width.

An encoder reads the text; K learned query tokens read the encoder's output; one small MLP per
query slot maps each of the K results to the LLM's hidden size. With an encoder-decoder backbone
(T5, the reference's choice) the K queries are the decoder's input embeddings, as in the
reference. An encoder-only backbone (BERT family, e.g. the bundled all-MiniLM-L6-v2) has no
decoder, so the queries read it through a few cross-attention blocks instead.

The question network of the paper has the same shape (question -> K query vectors), so it is a
second instance of this class over the question encoder.

``SlotNorm`` (on by default for documents, ``standardize_slots``; not in the paper) standardises
each slot across documents, as batch normalisation does. In short CPU runs without it (see
docs/JOURNAL.md), each of the K outputs was dominated by a per-slot constant far larger than its
variation between documents, so every slot snapped to the same one or two codes whatever the
document and the bank held nothing about it. Standardised, only what tells documents apart
reaches the bank. Training uses the batch's statistics; eval uses running averages, which freeze
with the codebook (they are part of its fingerprint: they change what a stored index means).
The question network's outputs get a LayerNorm under the same switch: they are the aggregator's
residual stream, and without it they grew so large that what it read from the bank vanished
beside them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from mbc.errors import MBCError
from mbc.network.layers import CrossAttentionBlock, SlotMLP


def encoder_width(encoder: nn.Module) -> int:
    config = encoder.config
    return getattr(config, "d_model", None) or config.hidden_size


def _embeddings_and_layers(encoder: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    if getattr(encoder.config, "is_encoder_decoder", False):  # T5: its encoder stack (the decoder reads the queries)
        return encoder.shared, encoder.encoder.block
    return encoder.embeddings, encoder.encoder.layer  # the BERT family


def freeze_below_top(encoder: nn.Module, trained_layers: int) -> list[nn.Module]:
    """Freeze the embeddings and every layer but the top ``trained_layers``; returns the frozen modules."""
    embeddings, layers = _embeddings_and_layers(encoder)
    if trained_layers > len(layers):
        raise MBCError(f"encoder_trained_layers={trained_layers} but the encoder has only {len(layers)} layers")
    frozen = [embeddings, *layers[: len(layers) - trained_layers]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


class SlotNorm(nn.Module):
    """Per slot: minus the mean over documents, divided by the root-mean-square deviation (one
    scalar per slot, so no single feature is blown up); no learned affine."""

    def __init__(self, num_slots: int, dim: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_slots, dim))
        self.register_buffer("running_std", torch.ones(num_slots, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [documents, K, dim]. Statistics are over the documents of every process together."""
        if self.training:
            count = _all_reduce_sum(z.new_tensor(float(z.shape[0])))
            if count >= 2:  # the same decision on every process; one document says nothing about the spread
                mean = _all_reduce_sum(z.sum(0)) / count
                spread = _all_reduce_sum((z - mean).pow(2).mean(-1).sum(0)) / count
                std = spread.sqrt().clamp(min=1e-6)[:, None]
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_std.lerp_(std.detach(), self.momentum)
                return (z - mean) / std
        return (z - self.running_mean) / self.running_std


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes; the gradient flows through this process's own part."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        total = tensor.detach().clone()
        torch.distributed.all_reduce(total)
        return tensor + (total - tensor).detach()
    return tensor


class AmortizationNetwork(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        num_slots: int,
        out_dim: int,
        reader_blocks: int = 2,
        train_encoder: bool = True,
        output_norm: str | None = None,
        trained_layers: int | None = None,
    ):
        """``trained_layers``: with ``train_encoder``, only the encoder's top N layers train (None: all of it)."""
        super().__init__()
        self.encoder = encoder
        if getattr(encoder, "pooler", None) is not None:
            # BERT's pooled output is never used: dropping the pooler keeps every remaining
            # parameter in the loss, which distributed training requires.
            encoder.pooler = None
        self.encoder.requires_grad_(train_encoder)
        # Frozen modules run without dropout, so that what they make of a text depends on the text alone.
        self._frozen = freeze_below_top(encoder, trained_layers) if train_encoder and trained_layers is not None else []
        self.frozen_layers = max(len(self._frozen) - 1, 0)
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
        # "slot": standardise each slot across documents (the bank); "layer": each vector on its own
        # (the question queries, which are the aggregator's residual stream, so that what it reads
        # from the bank is not drowned by their scale); None: as in the paper.
        self.slot_norm = SlotNorm(num_slots, out_dim) if output_norm == "slot" else None
        self.layer_norm = nn.LayerNorm(out_dim) if output_norm == "layer" else None

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The K query slots after reading the text: [batch, K, encoder width]."""
        queries = self.queries.expand(input_ids.shape[0], -1, -1)
        if self.is_encoder_decoder:
            encoded = self.encoder.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.encoder.decoder(
                inputs_embeds=queries, encoder_hidden_states=encoded, encoder_attention_mask=attention_mask
            ).last_hidden_state
        encoded = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._read_encoded(encoded, attention_mask)

    def _read_encoded(self, encoded: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        slots, mask = self.queries.expand(encoded.shape[0], -1, -1), attention_mask.bool()
        for block in self.reader:
            slots = block(slots, encoded, memory_mask=mask)
        return slots

    # ---- in two parts: what the frozen lower layers make of a text, kept by training (activations.py)
    @property
    def splits(self) -> bool:
        """Whether the frozen lower layers can run apart (a BERT-family encoder with some of them frozen)."""
        return self.frozen_layers > 0 and not self.is_encoder_decoder

    def _bidirectional(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        return create_bidirectional_mask(
            config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
        )

    @torch.no_grad()
    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, T] -> the hidden state entering the first trained layer [batch, T, width]."""
        hidden = self.encoder.embeddings(input_ids=input_ids)
        mask = self._bidirectional(hidden, attention_mask)
        for layer in self.encoder.encoder.layer[: self.frozen_layers]:
            hidden = layer(hidden, mask)
        return hidden

    def forward_from_lower(self, lower: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``forward`` from ``lower`` of the same text."""
        hidden, mask = lower, self._bidirectional(lower, attention_mask)
        for layer in self.encoder.encoder.layer[self.frozen_layers :]:
            hidden = layer(hidden, mask)
        return self._output(self._read_encoded(hidden, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, T] -> context vectors [batch, K, out_dim]."""
        return self._output(self.read(input_ids, attention_mask))

    def _output(self, slots: torch.Tensor) -> torch.Tensor:
        vectors = self.slot_mlp(slots)
        if self.slot_norm is not None:
            return self.slot_norm(vectors)
        return vectors if self.layer_norm is None else self.layer_norm(vectors)

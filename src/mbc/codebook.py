"""Codebook compression of the memory bank (vector quantization), after van den Oord et al. 2017.

Each context vector is replaced by its nearest code (L2) and only the code's index is stored.
Training uses the straight-through estimator and the VQ loss
``||sg[z] - e||^2 + beta * ||z - sg[e]||^2``. Against codebook collapse, an exponential moving
average of each code's usage is kept while training, and codes whose average falls below a
threshold are overwritten with encoder outputs from the current batch ("online resetting").
Resetting happens only in training mode: once documents are stored the codebook must never change,
or every stored index would silently point at a different vector.

``ResidualQuantizer`` chains several codebooks (each quantizes what the previous ones left): the
way to trade more bytes per vector for a more faithful bank. With one stage it is exactly the
paper's single codebook.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [..., dim]; in training, carries the straight-through gradient to z
    indices: torch.Tensor  # [..., stages] int64 while computing; stored as the smallest unsigned type
    loss: torch.Tensor  # codebook + beta * commitment, summed over stages
    perplexity: torch.Tensor  # exp(entropy) of the code histogram of this batch (first stage)


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        num_codes: int = 512,
        dim: int = 576,
        beta: float = 0.25,
        ema_decay: float = 0.99,
        dead_threshold: float = 1e-4,
    ):
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.ema_decay, self.dead_threshold = beta, ema_decay, dead_threshold
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes))
        # Usage starts at zero, so the first training batch revives every code it did not pick from
        # real encoder outputs: a data-dependent initialisation for free.
        self.register_buffer("usage", torch.zeros(num_codes))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (L2) for each vector of z [..., dim]."""
        flat = z.detach().reshape(-1, self.dim)
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)
        return distances.argmin(dim=1).reshape(z.shape[:-1])

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices.long(), self.codebook)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        indices = self.nearest(z)
        codes = self.decode(indices)
        loss = F.mse_loss(codes, z.detach()) + self.beta * F.mse_loss(z, codes.detach())
        counts = torch.bincount(indices.flatten(), minlength=self.num_codes).to(z.dtype)
        if self.training:
            self._update_usage_and_reset(counts, z)
        return QuantizerOutput(
            quantized=z + (codes - z).detach(),
            indices=indices.unsqueeze(-1),
            loss=loss,
            perplexity=perplexity(counts),
        )

    @torch.no_grad()
    def _update_usage_and_reset(self, counts: torch.Tensor, z: torch.Tensor) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process must see the same usage and the same replacements, or their codebooks drift apart.
            torch.distributed.all_reduce(counts)
        self.usage.mul_(self.ema_decay).add_(counts / counts.sum(), alpha=1 - self.ema_decay)
        dead = (self.usage < self.dead_threshold).nonzero().flatten()
        if dead.numel() == 0:
            return
        candidates = z.detach().reshape(-1, self.dim)
        picks = torch.randint(len(candidates), (dead.numel(),), device=z.device)
        replacement = candidates[picks]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(replacement, src=0)
        self.codebook.data[dead] = replacement
        self.usage[dead] = self.usage.mean()

    def fraction_alive(self) -> float:
        return (self.usage >= self.dead_threshold).float().mean().item()


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


def _all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
        tensor /= torch.distributed.get_world_size()
    return tensor


class ResidualQuantizer(nn.Module):
    """``num_stages`` codebooks in sequence; stage s quantizes z minus the codes of stages < s.

    With ``num_slots`` set, vectors arrive as [..., num_slots, dim] and each slot's running mean is
    subtracted before quantization and added back after ("slot centering"). Measured here: the
    amortization network's K outputs are each dominated by a per-slot constant (norm ~35 against
    ~1 of variation across documents), so without centering every slot snaps to the same one or
    two codes whatever the document, and the bank stores nothing about it. The means are running
    averages over training batches, frozen with the codebook, and part of the fingerprint.
    """

    def __init__(self, num_stages: int = 1, num_slots: int | None = None, **quantizer_kwargs):
        super().__init__()
        self.stages = nn.ModuleList(VectorQuantizer(**quantizer_kwargs) for _ in range(num_stages))
        self.num_slots = num_slots
        if num_slots is not None:
            self.register_buffer("slot_mean", torch.zeros(num_slots, self.stages[0].dim))
            self.register_buffer("slot_mean_ready", torch.zeros((), dtype=torch.bool))

    @property
    def num_codes(self) -> int:
        return self.stages[0].num_codes

    def _center(self, z: torch.Tensor) -> torch.Tensor:
        if self.num_slots is None:
            return z
        if self.training:
            with torch.no_grad():
                batch_mean = _all_reduce_mean(z.detach().reshape(-1, self.num_slots, z.shape[-1]).mean(0))
                if not self.slot_mean_ready:
                    self.slot_mean.copy_(batch_mean)
                    self.slot_mean_ready.fill_(True)
                else:
                    decay = self.stages[0].ema_decay
                    self.slot_mean.mul_(decay).add_(batch_mean, alpha=1 - decay)
        return z - self.slot_mean

    def _uncenter(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors if self.num_slots is None else vectors + self.slot_mean

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        residual = self._center(z)
        total, losses, indices, first_perplexity = torch.zeros_like(z), [], [], None
        for stage in self.stages:
            out = stage(residual)
            codes = stage.decode(out.indices[..., 0])
            total = total + codes
            residual = residual - codes.detach()
            losses.append(out.loss)
            indices.append(out.indices)
            first_perplexity = out.perplexity if first_perplexity is None else first_perplexity
        return QuantizerOutput(
            quantized=z + (self._uncenter(total) - z).detach(),
            indices=torch.cat(indices, dim=-1),
            loss=torch.stack(losses).sum(),
            perplexity=first_perplexity,
        )

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Indices [..., stages] of z, with no effect on usage, codes or slot means (what storing uses)."""
        residual = z - self.slot_mean if self.num_slots is not None else z
        indices = []
        for stage in self.stages:
            indices.append(stage.nearest(residual))
            residual = residual - stage.decode(indices[-1])
        return torch.stack(indices, dim=-1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [..., stages] (with the slot axis before it when centering) -> vectors [..., dim]."""
        return self._uncenter(sum(stage.decode(indices[..., s]) for s, stage in enumerate(self.stages)))

    def fraction_alive(self) -> float:
        return float(np.mean([stage.fraction_alive() for stage in self.stages]))

    def fingerprint(self) -> str:
        """A short hash of every codebook: a bank written under one fingerprint is only readable under it."""
        digest = hashlib.sha256()
        tables = [stage.codebook for stage in self.stages] + ([self.slot_mean] if self.num_slots is not None else [])
        for table in tables:
            digest.update(table.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

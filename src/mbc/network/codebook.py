"""Codebook compression of the memory bank (vector quantization), after van den Oord et al. 2017.

Each context vector is replaced by its nearest code (L2) and only the code's index is stored.
Training uses the straight-through estimator and the VQ loss
``||sg[z] - e||^2 + beta * ||z - sg[e]||^2``. Against codebook collapse, an exponential moving
average of each code's usage is kept while training, and codes whose average falls below a
threshold are overwritten with encoder outputs from the current batch ("online resetting").
Resetting happens only in training mode: once documents are stored the codebook must never change,
or every stored index would silently point at a different vector.

``metric="cosine"`` (not in the paper; lucidrains' ``use_cosine_sim``, after Yu et al. 2022,
"Vector-quantized image modeling with improved VQGAN") looks codes up by direction: vectors and
codes are both scaled to norm sqrt(dim) before the nearest code is found, and the bank decodes to
the scaled code. With L2 lookup in this high-dimensional space a code near the centre of the
encoder outputs is the nearest one to nearly every vector, and gradient steps on the codes pull
the winners further in: in short CPU runs most vectors snapped to a handful of codes and the bank
carried little about its document (docs/JOURNAL.md). The aggregator LayerNorms every memory vector
before reading it, so only a vector's direction reaches it anyway.

``update="ema"`` (not in the paper; van den Oord et al.'s appendix and VQ-VAE-2) moves each code
to the running mean of the vectors assigned to it instead of by a gradient step: the codebook
term of the VQ loss then carries no gradient and only the commitment term trains the encoder.
Adam moves a code by about the learning rate per step (3e-4 in the cpu preset) while the vectors
it stands for are ~1 per coordinate, so with gradient updates a code barely follows the encoder and
a fitted codebook collapses again once the encoder moves (docs/JOURNAL.md, "which half of reading
learns slowly, and a cosine codebook").

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

from mbc.config import METRICS, UPDATES


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
        metric: str = "l2",
        update: str = "gradient",
    ):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"codebook metric must be one of {METRICS}, got {metric!r}")
        if update not in UPDATES:
            raise ValueError(f"codebook update must be one of {UPDATES}, got {update!r}")
        self.num_codes, self.dim, self.metric, self.update = num_codes, dim, metric, update
        self.beta, self.ema_decay, self.dead_threshold = beta, ema_decay, dead_threshold
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes))
        # Usage starts at zero, so the first training batch revives every code it did not pick from
        # real encoder outputs: a data-dependent initialisation for free.
        self.register_buffer("usage", torch.zeros(num_codes))
        if update == "ema":
            # usage is the running share of vectors each code gets; code_sums the running sum of those
            # vectors over the same shares, so code_sums / usage is the running mean a code moves to.
            self.codebook.requires_grad_(False)
            self.register_buffer("code_sums", torch.zeros(num_codes, dim))

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine metric: x at norm sqrt(dim), where every vector and code lives; L2: x itself."""
        return F.normalize(x, dim=-1) * self.dim**0.5 if self.metric == "cosine" else x

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each vector of z [..., dim]."""
        flat = self._scaled(z.detach().reshape(-1, self.dim))
        codebook = self._scaled(self.codebook)
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
        return distances.argmin(dim=1).reshape(z.shape[:-1])

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return self._scaled(F.embedding(indices.long(), self.codebook))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z = self._scaled(z)
        indices = self.nearest(z)
        codes = self.decode(indices)
        loss = F.mse_loss(codes, z.detach()) + self.beta * F.mse_loss(z, codes.detach())
        counts = torch.bincount(indices.flatten(), minlength=self.num_codes).to(z.dtype)
        if self.training:
            self._update_usage_and_reset(counts, z, indices)
        return QuantizerOutput(
            quantized=z + (codes - z).detach(),
            indices=indices.unsqueeze(-1),
            loss=loss,
            perplexity=perplexity(counts),
        )

    @torch.no_grad()
    def _update_usage_and_reset(self, counts: torch.Tensor, z: torch.Tensor, indices: torch.Tensor) -> None:
        flat = z.detach().reshape(-1, self.dim)
        sums = (
            torch.zeros_like(self.codebook).index_add_(0, indices.flatten(), flat.to(self.codebook.dtype))
            if self.update == "ema"
            else None
        )
        if _distributed():
            # Every process must see the same usage, sums and replacements, or their codebooks drift apart.
            torch.distributed.all_reduce(counts)
            if sums is not None:
                torch.distributed.all_reduce(sums)
        total = counts.sum()
        self.usage.mul_(self.ema_decay).add_(counts / total, alpha=1 - self.ema_decay)
        if sums is not None:
            self.code_sums.mul_(self.ema_decay).add_(sums / total, alpha=1 - self.ema_decay)
            used = self.usage > 0
            self.codebook.data[used] = self.code_sums[used] / self.usage[used, None]
        dead = (self.usage < self.dead_threshold).nonzero().flatten()
        if dead.numel() == 0:
            return
        picks = torch.randint(len(flat), (dead.numel(),), device=z.device)
        replacement = flat[picks]
        if _distributed():
            torch.distributed.broadcast(replacement, src=0)
        self._set_codes(dead, replacement, self.usage.mean())

    def _set_codes(self, which: torch.Tensor, vectors: torch.Tensor, share: torch.Tensor | float) -> None:
        """Overwrite codes and count each as used by this share of vectors (EMA: as if its vector had
        been their running mean all along)."""
        self.codebook.data[which] = vectors.to(self.codebook.dtype)
        self.usage[which] = share
        if self.update == "ema":
            self.code_sums[which] = self.codebook.data[which] * share

    @torch.no_grad()
    def fit(self, z: torch.Tensor, iterations: int = 10, seed: int = 0) -> None:
        """Set the codes to k-means centroids of the vectors z [N, dim] and count every code as used."""
        points = self._scaled(z.reshape(-1, self.dim).float())
        centroids = kmeans(points, self.num_codes, iterations, torch.Generator().manual_seed(seed))
        self._set_codes(torch.arange(self.num_codes, device=centroids.device), centroids, 1 / self.num_codes)

    def fraction_alive(self) -> float:
        return (self.usage >= self.dead_threshold).float().mean().item()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """k centroids [k, dim] of points [N, dim] by Lloyd's algorithm, started from random points
    (distinct when N >= k); an empty cluster keeps its place."""
    starts = (
        torch.randperm(len(points), generator=generator)[:k]
        if len(points) >= k
        else torch.randint(len(points), (k,), generator=generator)
    )
    centroids = points[starts.to(points.device)].clone()
    for _ in range(iterations):
        nearest = torch.cdist(points, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, points)
        counts = torch.bincount(nearest, minlength=k).to(points.dtype)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


class ResidualQuantizer(nn.Module):
    """``num_stages`` codebooks in sequence; stage s quantizes z minus the codes of stages < s.
    ``first_stage``: a stage of another kind in first place (network/vocabulary.py: the LLM's own
    token table), the learned ones after it."""

    def __init__(self, num_stages: int = 1, first_stage: nn.Module | None = None, **quantizer_kwargs):
        super().__init__()
        first = [first_stage] if first_stage is not None else []
        self.stages = nn.ModuleList(
            first + [VectorQuantizer(**quantizer_kwargs) for _ in range(num_stages - len(first))]
        )

    @property
    def num_codes(self) -> int:
        """The most codes of any stage: what each stored index must be able to hold."""
        return max(stage.num_codes for stage in self.stages)

    def learned_codes(self) -> int:
        """Codes this model keeps beside the LLM (a vocabulary stage's are the LLM's own)."""
        return sum(stage.num_codes for stage in self.stages if isinstance(stage, VectorQuantizer))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        residual, total, losses, indices, first_perplexity = z, torch.zeros_like(z), [], [], None
        for stage in self.stages:
            out = stage(residual)
            codes = stage.decode(out.indices[..., 0])
            total = total + codes
            residual = residual - codes.detach()
            losses.append(out.loss)
            indices.append(out.indices)
            first_perplexity = out.perplexity if first_perplexity is None else first_perplexity
        return QuantizerOutput(
            quantized=z + (total - z).detach(),
            indices=torch.cat(indices, dim=-1),
            loss=torch.stack(losses).sum(),
            perplexity=first_perplexity,
        )

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Indices [..., stages] of z, with no effect on usage or codes (what storing uses)."""
        residual, indices = z, []
        for stage in self.stages:
            indices.append(stage.nearest(residual))
            residual = residual - stage.decode(indices[-1])
        return torch.stack(indices, dim=-1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [..., stages] -> vectors [..., dim]: the sum of each stage's code."""
        return sum(stage.decode(indices[..., s]) for s, stage in enumerate(self.stages))

    @torch.no_grad()
    def fit(self, z: torch.Tensor, iterations: int = 10, seed: int = 0) -> None:
        """k-means initialisation: each stage's codes fitted to what the stages before it leave of z."""
        residual = z.reshape(-1, z.shape[-1]).float()
        for s, stage in enumerate(self.stages):
            stage.fit(residual, iterations, seed + s)
            residual = residual - stage.decode(stage.nearest(residual))

    def fraction_alive(self) -> float:
        return float(np.mean([stage.fraction_alive() for stage in self.stages]))

    def tables(self) -> list[torch.Tensor]:
        """What stored indices mean: every codebook."""
        return [stage.codebook for stage in self.stages]


def fingerprint(tables: list[torch.Tensor]) -> str:
    """A short hash of tensors: a bank written under one fingerprint is only readable under it."""
    digest = hashlib.sha256()
    for table in tables:
        digest.update(table.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]

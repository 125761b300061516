"""Every setting of an MBC model, in one dataclass saved beside each checkpoint as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from mbc.errors import MBCError
from mbc.settings import Range, check, from_dict

# Kept here, not beside the code that uses them, so that reading a config loads no torch.
BUNDLED_LLM = "bundled:smollm2"  # network/backbones.py
BUNDLED_ENCODER = "bundled:minilm"
METRICS = ("l2", "cosine")  # codebook lookup (network/codebook.py)
UPDATES = ("gradient", "ema")  # how codes move (network/codebook.py)


@dataclass
class MBCConfig:
    # Backbones, by name (see backbones.py): recorded so a checkpoint knows what to load.
    llm: str = BUNDLED_LLM
    document_encoder: str = BUNDLED_ENCODER
    question_encoder: str = BUNDLED_ENCODER
    llm_quantization: str | None = (
        None  # "nf4": load the base LLM in 4-bit NF4 (bitsandbytes, GPU), as the reference does for Llama-2
    )
    train_encoders: bool = True  # the reference fine-tunes its T5 encoders
    # With train_encoders: only the top N layers of each encoder train, their embeddings and lower
    # layers stay frozen (and training keeps what those make of each text). None: all of it (the reference).
    encoder_trained_layers: int | None = None
    reader_blocks: int = 2  # cross-attention blocks reading an encoder-only backbone (unused for T5)

    # Amortization and question networks
    num_slots: int = 12  # K: context vectors per document and query vectors per question
    max_document_tokens: int = 512
    max_question_tokens: int = 64

    # Codebook (MBC). quantize=False gives MAC: the bank stores the float vectors themselves.
    quantize: bool = True
    codebook_size: int = 512
    codebook_stages: int = 1  # > 1: residual quantization, one index per stage per vector
    codebook_metric: str = "l2"  # "l2" (the paper) or "cosine": codes looked up by direction (codebook.py)
    # "gradient" (the paper: the VQ loss trains the codes) or "ema": codes follow the running mean of their vectors
    codebook_update: str = "gradient"
    standardize_slots: bool = (
        True  # normalise the networks' outputs (amortization.py: SlotNorm, LayerNorm); False = the paper as written
    )
    standardize_modulation: bool = (
        False  # SlotNorm on the modulation before the prefix (model.py, prefix); False = the paper as written
    )
    beta: float = 0.25
    vq_weight: float = 1.0  # lambda
    ema_decay: float = 0.99
    dead_threshold: float = 1e-4

    # Aggregation network
    aggregator_blocks: int = 4
    aggregator_heads: int = 8
    aggregator_head_dim: int = 96
    aggregator_output: str = (
        "residual"  # "residual" (the paper) or "reads": only what was read from the bank (aggregation.py)
    )

    # Retrieval keys (network/retrieval.py; not in the paper): each document also stores its sentence
    # embedding, product-quantized, and each question reads only its top-k documents by it.
    # 0 = the paper: every question reads the whole bank.
    retrieval_top_k: int = 0
    retrieval_subspaces: int = 8  # indices per document's key
    retrieval_codes: int = 256  # centroids per index (256: one byte each)

    # Prefix (P-tuning v2) and KV-LoRA on the frozen LLM
    prefix_tokens: int = 2  # P
    prefix_layers: int | None = None  # the last N layers get a prefix; None = all layers
    prefix_hidden: int | None = None  # width of each prefix feed-forward block; None = LLM width
    lora_layers: int = 6  # the last N layers get KV-LoRA; 0 = none
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05

    # How a question is put to the LLM; the answer follows it (training: " answer" + EOS).
    prompt_template: str = "Question: {question}\nAnswer:"

    def __post_init__(self):
        check(self, LIMITS)
        if self.codebook_metric == "cosine" and self.codebook_stages > 1:
            raise MBCError("codebook_metric 'cosine' works with one codebook stage only (a residual has no fixed norm)")
        if "{question}" not in self.prompt_template:
            raise MBCError("prompt_template must contain '{question}'")
        try:
            self.prompt_template.format(question="")
        except (KeyError, IndexError, ValueError) as error:
            raise MBCError(
                f"prompt_template may hold only the field {{question}} (write {{{{ and }}}} for braces): {error!r}"
            ) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MBCConfig":
        return from_dict(cls, values)

    @classmethod
    def load(cls, path: str | Path) -> "MBCConfig":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise MBCError(f"cannot read config {path}: {error}") from error
        if not isinstance(values, dict):
            raise MBCError(f"config {path} must be a JSON object of MBCConfig fields")
        return cls.from_dict(values.get("config", values))


# Upper ends keep a typo from allocating tens of gigabytes (codebook_size 2**30 would take 137 GB).
LIMITS = {
    "llm_quantization": (None, "nf4"),
    "reader_blocks": Range(1, 64),
    "encoder_trained_layers": Range(0, None),
    "num_slots": Range(1, 1024),
    "max_document_tokens": Range(1, 32768),
    "max_question_tokens": Range(1, 32768),
    "codebook_size": Range(2, 65536),
    "codebook_stages": Range(1, 16),
    "codebook_metric": METRICS,
    "codebook_update": UPDATES,
    "beta": Range(0, None),
    "vq_weight": Range(0, None),
    "ema_decay": Range(0, 1),
    "dead_threshold": Range(0, 1),
    "aggregator_blocks": Range(1, 64),
    "aggregator_heads": Range(1, 256),
    "aggregator_head_dim": Range(1, 4096),
    "aggregator_output": ("residual", "reads"),
    "retrieval_top_k": Range(0, None),
    "retrieval_subspaces": Range(1, 1024),
    "retrieval_codes": Range(2, 65536),
    "prefix_tokens": Range(1, 1024),
    "prefix_layers": Range(1, None),
    "prefix_hidden": Range(1, 65536),
    "lora_layers": Range(0, None),
    "lora_rank": Range(1, 4096),
    "lora_alpha": Range(0, None),
    "lora_dropout": Range(0, 1),
}

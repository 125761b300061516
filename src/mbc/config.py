"""Every setting of an MBC model, in one dataclass saved beside each checkpoint as JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Literal, get_args

from mbc.errors import MBCError
from mbc.settings import Field, from_dict, settings

# Kept here, not beside the code that uses them, so that reading a config loads no torch.
BUNDLED_LLM = "bundled:smollm2"  # network/backbones.py
BUNDLED_ENCODER = "bundled:minilm"
Metric = Literal["l2", "cosine"]  # codebook lookup (network/codebook.py)
Update = Literal["gradient", "ema"]  # how codes move (network/codebook.py)
METRICS, UPDATES = get_args(Metric), get_args(Update)


# Upper ends keep a typo from allocating tens of gigabytes (codebook_size 2**30 would take 137 GB).
@settings
class MBCConfig:
    # Backbones, by name (see backbones.py): recorded so a checkpoint knows what to load.
    llm: str = BUNDLED_LLM
    document_encoder: str = BUNDLED_ENCODER
    question_encoder: str = BUNDLED_ENCODER
    llm_quantization: Literal["nf4"] | None = (
        None  # "nf4": load the base LLM in 4-bit NF4 (bitsandbytes, GPU), as the reference does for Llama-2
    )
    train_encoders: bool = True  # the reference fine-tunes its T5 encoders
    # With train_encoders: only the top N layers of each encoder train, their embeddings and lower
    # layers stay frozen (and training keeps what those make of each text). None: all of it (the reference).
    encoder_trained_layers: Annotated[int, Field(ge=0)] | None = None
    reader_blocks: Annotated[int, Field(ge=1, le=64)] = (
        2  # cross-attention blocks reading an encoder-only backbone (unused for T5)
    )

    # Amortization and question networks
    num_slots: Annotated[int, Field(ge=1, le=1024)] = (
        12  # K: context vectors per document and query vectors per question
    )
    max_document_tokens: Annotated[int, Field(ge=1, le=32768)] = 512
    max_question_tokens: Annotated[int, Field(ge=1, le=32768)] = 64

    # Codebook (MBC). quantize=False gives MAC: the bank stores the float vectors themselves.
    quantize: bool = True
    # "learned" (the paper): codes trained with the VQ loss. "vocabulary": the first (or only) stage's
    # codes are the base LLM's input embeddings, frozen, each code a token id (network/vocabulary.py).
    codebook: Literal["learned", "vocabulary"] = "learned"
    # How the LLM reads a question's codes: "prefix" (the paper: aggregation -> P-tuning v2 prefix), or
    # "input" (vocabulary codes only): the top-1 document's K token ids before the question, read by
    # the LLM with its KV-LoRA, as it reads any text (model.py).
    code_reading: Literal["prefix", "input"] = "prefix"
    # Vocabulary codes: each slot points at the document's own tokens, keyed by the frozen LLM's
    # hidden states entering layer pointer_layer, plus a learned residual (network/pointer.py).
    code_pointer: bool = False
    pointer_layer: Annotated[int, Field(ge=0, le=1024)] = 20
    pointer_positions: bool = False  # the pointer's keys and queries also learn places (network/pointer.py)
    pointer_placement: bool = False  # slots laid along the document by a learned salience (network/pointer.py)
    pointer_copy: bool = False  # that placement hard and no residual: each slot copies a document token (pointer.py)
    # Vocabulary codes read as tokens: store each document's K token ids in this many bytes under a
    # prefix code fitted on the training documents (network/token_coding.py, the token memory's
    # entry_bytes: ~11 bits a token instead of 16), the longest head of them that fits. None: 16 bits each.
    code_entry_bytes: Annotated[int | None, Field(ge=1, le=65536)] = None
    # ... and after them, in this many more bytes, the document's rarest tokens its codes do not hold
    # (the longest prefix codes first): an index that BM25 (lexical_weight) matches and the reader never
    # reads, since a paragraph's answer-bearing codes leave out words its questions ask by (JOURNAL, session 37)
    index_entry_bytes: Annotated[int, Field(ge=0, le=65536)] = 0
    codebook_size: Annotated[int, Field(ge=2, le=65536)] = 512
    codebook_stages: Annotated[int, Field(ge=1, le=16)] = (
        1  # > 1: residual quantization, one index per stage per vector
    )
    codebook_metric: Metric = "l2"  # "l2" (the paper) or "cosine": codes looked up by direction (codebook.py)
    # "gradient" (the paper: the VQ loss trains the codes) or "ema": codes follow the running mean of their vectors
    codebook_update: Update = "gradient"
    standardize_slots: bool = (
        True  # normalise the networks' outputs (amortization.py: SlotNorm, LayerNorm); False = the paper as written
    )
    standardize_modulation: bool = (
        False  # SlotNorm on the modulation before the prefix (model.py, prefix); False = the paper as written
    )
    beta: Annotated[float, Field(ge=0)] = 0.25
    vq_weight: Annotated[float, Field(ge=0)] = 1.0  # lambda
    ema_decay: Annotated[float, Field(ge=0, le=1)] = 0.99
    dead_threshold: Annotated[float, Field(ge=0, le=1)] = 1e-4

    # Aggregation network
    aggregator_blocks: Annotated[int, Field(ge=1, le=64)] = 4
    aggregator_heads: Annotated[int, Field(ge=1, le=256)] = 8
    aggregator_head_dim: Annotated[int, Field(ge=1, le=4096)] = 96
    aggregator_output: Literal["residual", "reads"] = (
        "residual"  # "residual" (the paper) or "reads": only what was read from the bank (aggregation.py)
    )

    # Retrieval keys (network/retrieval.py; not in the paper): each document also stores its sentence
    # embedding, product-quantized, and each question reads only its top-k documents by it.
    # 0 = the paper: every question reads the whole bank.
    retrieval_top_k: Annotated[int, Field(ge=0)] = 0
    retrieval_subspaces: Annotated[int, Field(ge=1, le=1024)] = 8  # indices per document's key
    retrieval_codes: Annotated[int, Field(ge=2, le=65536)] = 256  # centroids per index (256: one byte each)
    # Vocabulary codes: BM25 over each document's stored token ids, this much beside the key's score
    # (network/lexical.py; the token memory's lexical_weight): a lexical index at no stored byte.
    lexical_weight: Annotated[float, Field(ge=0)] = 0.0

    # Prefix (P-tuning v2) and KV-LoRA on the frozen LLM
    prefix_tokens: Annotated[int, Field(ge=1, le=1024)] = 2  # P
    prefix_layers: Annotated[int, Field(ge=1)] | None = None  # the last N layers get a prefix; None = all layers
    prefix_hidden: Annotated[int, Field(ge=1, le=65536)] | None = (
        None  # width of each prefix feed-forward block; None = LLM width
    )
    lora_layers: Annotated[int, Field(ge=0)] = 6  # the last N layers get KV-LoRA; 0 = none
    lora_rank: Annotated[int, Field(ge=1, le=4096)] = 16
    lora_alpha: Annotated[float, Field(ge=0)] = 32.0
    lora_dropout: Annotated[float, Field(ge=0, le=1)] = 0.05

    # How a question is put to the LLM; the answer follows it (training: " answer" + EOS).
    prompt_template: str = "Question: {question}\nAnswer:"

    def __post_init__(self):
        if self.code_reading == "input" and (
            self.codebook != "vocabulary" or self.codebook_stages != 1 or self.retrieval_top_k < 1
        ):
            raise MBCError(
                "code_reading 'input' puts its top documents' token ids before the question: it needs "
                "codebook=vocabulary, codebook_stages=1 and retrieval_top_k >= 1"
            )
        if self.code_entry_bytes is not None and self.code_reading != "input":
            raise MBCError(
                "code_entry_bytes stores vocabulary codes as a prefix code read as tokens: it needs "
                "code_reading=input (and so codebook=vocabulary)"
            )
        if self.index_entry_bytes and (
            self.code_entry_bytes is None or not self.code_pointer or not self.lexical_weight
        ):
            raise MBCError(
                "index_entry_bytes stores a document's rarest tokens for BM25 beside its prefix-coded codes: "
                "it needs code_entry_bytes, code_pointer=true and lexical_weight > 0"
            )
        if self.lexical_weight and (self.codebook != "vocabulary" or not self.retrieval_top_k):
            raise MBCError(
                "lexical_weight matches questions against stored token ids: it needs codebook=vocabulary "
                "and retrieval keys (retrieval_top_k >= 1)"
            )
        if (self.pointer_positions or self.pointer_placement) and not self.code_pointer:
            raise MBCError("pointer_positions and pointer_placement are the pointer's: they need code_pointer=true")
        if self.pointer_copy and not self.pointer_placement:
            raise MBCError("pointer_copy makes the pointer's placement hard: it needs pointer_placement=true")
        if self.code_pointer and self.codebook != "vocabulary":
            raise MBCError("code_pointer points slots at the document's tokens: it needs codebook=vocabulary")
        if self.codebook == "vocabulary" and not self.quantize:
            raise MBCError("codebook 'vocabulary' stores token ids: it needs quantize=True (MAC stores floats)")
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

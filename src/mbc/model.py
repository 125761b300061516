"""MBC: a frozen LLM answering from a codebook-compressed memory of amortized documents.

document --AmortizationNetwork--> K vectors --codec (codebook)--> K code indices (the bank)
question --question network--> K queries --Aggregator over the decoded bank--> modulation
          (with retrieval keys, over only the question's top-k documents: network/retrieval.py)
modulation --PrefixExpansion--> past keys/values --frozen LLM with KV-LoRA--> answer

``MBCModel`` owns the pieces and the method's three uses of them: ``forward`` (the paper's
meta-training loss on a batch of documents, questions and answers; the batch's documents form the
bank), ``compress`` (documents -> bank entries) and, with a reader over a bank (memory/readers.py),
answering. Training schedules (warm starts, curricula) live in mbc.training, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mbc import checkpoint
from mbc.bank import BankLayout
from mbc.bank.packing import index_dtype, packed_size
from mbc.config import MBCConfig
from mbc.errors import MBCError
from mbc.network import backbones
from mbc.network.aggregation import Aggregator
from mbc.network.amortization import AmortizationNetwork, SlotNorm
from mbc.network.backbones import Backbone
from mbc.network.codebook import ResidualQuantizer, fingerprint
from mbc.network.codecs import CodebookCodec, FloatCodec
from mbc.network.decoding import DecodingConfig, FirstLine, generate, shared_length
from mbc.network.frozen_llm import first_adapted_layer, lower_hidden, upper_hidden
from mbc.network.llm_layout import describe_llm
from mbc.network.lora import add_kv_lora
from mbc.network.prefix import PrefixExpansion, enable_prefix_attention, prefix_in
from mbc.network.retrieval import ProductQuantizer, SentenceEmbedder

IGNORE = -100  # label of tokens that carry no loss (the prompt, padding)
SHARED_START_TOKENS = 16  # prompts sharing at least this many first tokens run them once (decoding.greedy)


@dataclass
class MBCOutput:
    loss: torch.Tensor  # qa_loss + vq_weight * vq_loss
    qa_loss: torch.Tensor
    vq_loss: torch.Tensor
    perplexity: torch.Tensor  # codebook perplexity of this batch (0 in MAC mode)


def pad(sequences: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in sequences)
    filler = [[value] * (width - len(s)) for s in sequences]
    rows = [f + s if side == "left" else s + f for s, f in zip(sequences, filler)]
    return torch.tensor(rows, dtype=torch.long)


class MBCModel(nn.Module):
    def __init__(
        self,
        config: MBCConfig,
        llm: Backbone,
        document_encoder: Backbone,
        question_encoder: Backbone,
        key_encoder: Backbone | None = None,
    ):
        super().__init__()
        self.config = config
        self.trained_on: str | None = None  # what training read, kept in its checkpoints (describe_training)
        self.names = {
            "llm": llm.name,
            "document_encoder": document_encoder.name,
            "question_encoder": question_encoder.name,
        }
        self.llm, self.tokenizer = llm.model, llm.tokenizer
        self._first_line = None  # built on the first generate: a table over the vocabulary (decoding.FirstLine)
        self.document_tokenizer, self.question_tokenizer = document_encoder.tokenizer, question_encoder.tokenizer
        self.layout = describe_llm(self.llm)
        self.prefix_layers = config.prefix_layers or self.layout.num_layers
        for name, layers in (("prefix_layers", self.prefix_layers), ("lora_layers", config.lora_layers)):
            if layers > self.layout.num_layers:
                raise MBCError(f"{name}={layers} but the base LLM has only {self.layout.num_layers} layers")
        self.first_adapted_layer = first_adapted_layer(self.layout, self.prefix_layers, config.lora_layers)
        for name, encoder in (("max_document_tokens", document_encoder), ("max_question_tokens", question_encoder)):
            window = getattr(encoder.model.config, "max_position_embeddings", None)  # None: relative positions (T5)
            if window and getattr(config, name) > window:
                raise MBCError(
                    f"{name}={getattr(config, name)} is more than {encoder.name}'s window of {window} tokens"
                )
        if self.tokenizer.eos_token_id is None:
            raise MBCError(f"the tokenizer of '{llm.name}' has no EOS token, which answers must end with")

        self.llm.requires_grad_(False)
        self.llm.eval()  # frozen: no dropout inside the base model
        add_kv_lora(self.layout, config.lora_layers, config.lora_rank, config.lora_alpha, config.lora_dropout)
        enable_prefix_attention(self.llm)

        dim = self.layout.hidden_size
        norms = ("slot", "layer") if config.standardize_slots else (None, None)
        self.amortization = AmortizationNetwork(
            document_encoder.model,
            config.num_slots,
            dim,
            config.reader_blocks,
            config.train_encoders,
            output_norm=norms[0],
            trained_layers=config.encoder_trained_layers,
        )
        self.question_network = AmortizationNetwork(
            question_encoder.model,
            config.num_slots,
            dim,
            config.reader_blocks,
            config.train_encoders,
            output_norm=norms[1],
            trained_layers=config.encoder_trained_layers,
        )
        # MBC stores code indices (the codebook, network/codebook.py), MAC (quantize=False) the float
        # vectors; the codec (network/codecs.py) is the one place that tells them apart.
        self.quantizer = None
        self.codec = FloatCodec()
        if config.quantize:
            self.quantizer = ResidualQuantizer(
                config.codebook_stages,
                num_codes=config.codebook_size,
                dim=dim,
                beta=config.beta,
                ema_decay=config.ema_decay,
                dead_threshold=config.dead_threshold,
                metric=config.codebook_metric,
                update=config.codebook_update,
            )
            self.codec = CodebookCodec(self.quantizer, config.codebook_size, config.codebook_stages)
        self.aggregator = Aggregator(
            dim, config.aggregator_blocks, config.aggregator_heads, config.aggregator_head_dim, config.aggregator_output
        )
        self.embedder = self.retrieval_keys = None
        if config.retrieval_top_k:
            if key_encoder is None:
                raise MBCError(
                    "retrieval_top_k > 0 needs a frozen encoder for the retrieval keys (MBCModel.build loads one)"
                )
            self.embedder = SentenceEmbedder(key_encoder.model, key_encoder.tokenizer, config.max_document_tokens)
            self.retrieval_keys = ProductQuantizer(
                self.embedder.dim, config.retrieval_subspaces, config.retrieval_codes
            )
        # Standardised across questions (as SlotNorm does for documents): the prefix then sees how
        # this question and bank differ from others, not a large shared constant (docs/JOURNAL.md).
        self.modulation_norm = SlotNorm(config.num_slots, dim) if config.standardize_modulation else None
        self.prefix_expansion = PrefixExpansion(
            config.num_slots,
            dim,
            config.prefix_tokens,
            self.prefix_layers,
            self.layout.num_kv_heads,
            self.layout.head_dim,
            config.prefix_hidden or dim,
        )

    @classmethod
    def build(cls, config: MBCConfig | None = None) -> "MBCModel":
        """A fresh (untrained) model over the backbones the config names."""
        config = config or MBCConfig()
        document_encoder = backbones.load_encoder(config.document_encoder)
        question_encoder = (
            document_encoder
            if config.question_encoder == config.document_encoder and not config.train_encoders
            else backbones.load_encoder(config.question_encoder)
        )
        # The retrieval keys' encoder stays the pretrained one: a trained copy would change what stored keys mean.
        key_encoder = None
        if config.retrieval_top_k:
            key_encoder = (
                document_encoder if not config.train_encoders else backbones.load_encoder(config.document_encoder)
            )
        return cls(
            config,
            backbones.load_llm(config.llm, config.llm_quantization),
            document_encoder,
            question_encoder,
            key_encoder,
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.llm.eval()
        for module in self.llm.modules():  # only the adapters' dropout follows the mode
            if hasattr(module, "lora_A"):
                module.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return self.prefix_expansion.mix.device

    # ---- text -> tensors -------------------------------------------------------------------
    def _encode_text(self, tokenizer, texts: list[str], max_tokens: int):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def prompt_ids(self, question: str, template: str | None = None) -> list[int]:
        return self.tokenizer((template or self.config.prompt_template).format(question=question))["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [
            self.tokenizer.eos_token_id
        ]

    def training_row(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Prompt + answer + EOS token ids, and labels: IGNORE everywhere but the answer tokens."""
        prompt, target = self.prompt_ids(question), self.answer_ids(answer)
        return prompt + target, [IGNORE] * len(prompt) + target

    def training_inputs(self, questions: list[str], answers: list[str]):
        """``training_row`` of each question and answer, right-padded: ids, attention mask, labels."""
        rows = [self.training_row(q, a) for q, a in zip(questions, answers)]
        ids = pad([i for i, _ in rows], self.tokenizer.pad_token_id)
        labels = pad([label for _, label in rows], IGNORE)
        mask = pad([[1] * len(i) for i, _ in rows], 0)
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    # ---- the pieces ------------------------------------------------------------------------
    def document_tokens(self, documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode_text(self.document_tokenizer, documents, self.config.max_document_tokens)

    def question_tokens(self, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode_text(self.question_tokenizer, questions, self.config.max_question_tokens)

    def amortize(self, documents: list[str]) -> torch.Tensor:
        """Documents -> context vectors [N, K, dim] (before quantization)."""
        return self.amortization(*self.document_tokens(documents))

    def queries(self, questions: list[str]) -> torch.Tensor:
        return self.question_network(*self.question_tokens(questions))

    def modulation(
        self,
        questions: list[str],
        memory: torch.Tensor,
        memory_log_weight: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Questions and a memory [M, dim] (every vector of a bank, document after document) ->
        modulation [B, K, dim]: the method's reading, attention over the whole memory.
        ``memory_mask`` [B, M] (True = visible) gives each question its own part of it;
        ``memory_log_weight`` [M] weights each vector (a code by its count). A model with retrieval
        keys reads only each question's top documents: read its bank with memory.readers.RetrievalReader."""
        if self.retrieval_keys is not None:
            raise MBCError(
                "a model with retrieval_top_k > 0 reads only its top documents per question: "
                "read its bank with mbc.memory.readers.RetrievalReader (reader_for)"
            )
        log_weight = None if memory_log_weight is None else memory_log_weight[None]
        return self.aggregator(
            self.queries(questions), memory[None], memory_mask=memory_mask, memory_log_weight=log_weight
        )

    def read_documents(self, queries: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Queries [B, K, dim] and each question's chosen documents' vectors [B, k, K, dim] -> modulation."""
        return self.aggregator(queries, chosen.flatten(1, 2))

    def prefix(self, modulation: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.modulation_norm is not None:
            modulation = self.modulation_norm(modulation)
        return self.prefix_expansion(modulation)

    # ---- training: the paper's loss ----------------------------------------------------------
    def forward(
        self,
        documents: list[str],
        questions: list[str],
        answers: list[str],
        question_documents: list[int] | None = None,
    ) -> MBCOutput:
        """The meta-training loss, QA + lambda * VQ: the batch's documents form the bank that every
        question reads (with retrieval keys, ``question_documents``, the index of each question's own
        document, is required). mbc.training's objectives add the training schedule's variants."""
        memory = self.codec.training_memory(self.amortize(documents))
        modulation = self.training_modulation(questions, documents, memory.vectors, question_documents)
        qa_loss = self.qa_loss(questions, answers, self.prefix(modulation))
        return MBCOutput(qa_loss + self.config.vq_weight * memory.vq_loss, qa_loss, memory.vq_loss, memory.perplexity)

    def training_modulation(
        self,
        questions: list[str],
        documents: list[str],
        memory: torch.Tensor,
        question_documents: list[int] | None = None,
        visible: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each question's modulation from a training batch's bank ``memory`` [N, K, dim]. With
        retrieval keys a question reads its own document and the k - 1 others of the batch its key
        scores highest, as answering from a bank will; otherwise the whole batch bank, or the part
        ``visible`` [questions, N * K] lets it see. ``queries``: the questions' ``queries`` where
        the caller has them."""
        queries = self.queries(questions) if queries is None else queries
        if self.retrieval_keys is not None:
            if question_documents is None:
                raise MBCError(
                    "training with retrieval_top_k > 0 needs question_documents (each question's own document)"
                )
            chosen = self._training_reads(questions, documents, question_documents)
            return self.read_documents(queries, memory[chosen])
        return self.aggregator(queries, memory.reshape(1, -1, memory.shape[-1]), memory_mask=visible)

    def _training_reads(self, questions: list[str], documents: list[str], own: list[int]) -> torch.Tensor:
        """[B, k] batch documents each question reads: its own first, then the best-keyed others."""
        own_index = torch.tensor(own, device=self.device)[:, None]
        k = min(self.config.retrieval_top_k, len(documents))
        if k == 1:
            return own_index
        scores = self.retrieval_keys.scores(self.embedder(questions), self.retrieval_keys_of(documents))
        scores.scatter_(1, own_index, float("inf"))
        return scores.topk(k, dim=1).indices

    def qa_loss(self, questions: list[str], answers: list[str], prefix) -> torch.Tensor:
        """Mean negative log-likelihood of the answer tokens (+ EOS), as ``llm(labels=...).loss``
        computes it, but projecting onto the vocabulary only where an answer token is predicted:
        with short answers the projection of every prompt token was a fifth of a CPU step."""
        ids, mask, labels = self.training_inputs(questions, answers)
        with prefix_in(self.layout, prefix):
            hidden = self.llm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        return self._answer_loss(hidden, labels)

    @torch.no_grad()
    def lower_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training rows' ids [B, T] -> the hidden state entering the first layer with a prefix or KV-LoRA,
        which depends on the tokens alone (network/frozen_llm.py)."""
        return lower_hidden(self.llm, self.layout, ids, mask, self.first_adapted_layer)

    def qa_loss_from_lower(self, lower: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, prefix) -> torch.Tensor:
        """``qa_loss`` from ``lower_hidden`` of its rows, kept from an earlier step: only the layers
        that carry a prefix or KV-LoRA run."""
        with prefix_in(self.layout, prefix):
            hidden = upper_hidden(self.llm, self.layout, lower, mask, self.first_adapted_layer)
        return self._answer_loss(hidden, labels)

    def _answer_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        predicted = targets != IGNORE
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][predicted]).float()
        return F.cross_entropy(logits, targets[predicted])

    @torch.no_grad()
    def fit_codebook(self, documents: list[str], batch_size: int = 64) -> None:
        """k-means initialisation of the codebook on these documents' vectors, amortized as the
        bank will store them (eval mode): training's float-memory warm start ends with it."""
        mode = self.training
        self.eval()
        contexts = torch.cat(
            [self.amortize(documents[i : i + batch_size]) for i in range(0, len(documents), batch_size)]
        )
        self.train(mode)
        self.quantizer.fit(contexts)

    # ---- retrieval keys (retrieval.py) ---------------------------------------------------------
    def fit_retrieval_keys(self, documents: list[str]) -> None:
        """Fit the retrieval keys' centroids (k-means) on these documents' embeddings; training does
        this once, before the first step, on the training documents."""
        self.retrieval_keys.fit(self.embedder(documents))

    @torch.no_grad()
    def retrieval_keys_of(self, documents: list[str]) -> np.ndarray:
        """Documents -> their retrieval keys [N, subspaces], as the bank stores them."""
        codes = self.retrieval_keys.encode(self.embedder(documents))
        return codes.cpu().numpy().astype(index_dtype(self.config.retrieval_codes))

    def stored_keys(self, bank, ids: list[int]) -> torch.Tensor:
        """What a reader keeps of each stored document to choose among them (``top_documents``'s
        ``document_keys``): its retrieval key [n, subspaces]."""
        return torch.as_tensor(bank.retrieval_keys(ids)).long()

    @torch.no_grad()
    def top_documents(self, questions: list[str], document_keys) -> torch.Tensor:
        """[B, k] positions in ``document_keys`` [N, subspaces] of each question's best-scored documents."""
        scores = self.retrieval_keys.scores(self.embedder(questions), document_keys)
        return scores.topk(min(self.config.retrieval_top_k, scores.shape[1]), dim=1).indices

    # ---- the bank ----------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, documents: list[str]) -> np.ndarray:
        """Documents -> bank entries: code indices [N, K, stages] as the smallest unsigned type
        (MBC), or the float vectors [N, K, dim] as float32 (MAC mode)."""
        return self.codec.encode(self.amortize(documents))

    def memory(self, entries: np.ndarray) -> torch.Tensor:
        """Bank entries (as ``compress`` returns them) -> every stored vector, [N*K, dim]."""
        entries = torch.as_tensor(np.asarray(entries), device=self.device)
        return self.codec.decode(entries).reshape(-1, self.layout.hidden_size)

    # ---- answering (from a bank: memory/readers.py) -------------------------------------------
    @torch.no_grad()
    def answer(self, questions: list[str], memory: torch.Tensor, decoding: DecodingConfig | None = None) -> list[str]:
        """Answer each question from a memory [M, dim] (``memory(entries)``) read whole."""
        return self.generate_answers(questions, self.prefix(self.modulation(questions, memory)), decoding)

    @torch.no_grad()
    def answer_read(self, reader, questions: list[str], decoding: DecodingConfig | None = None):
        """Each question answered from what a reader over a bank (memory/readers.py) gives it; and
        the bank ids of the documents each read (None: the whole bank)."""
        modulation, read = reader.read(questions)
        return self.generate_answers(questions, self.prefix(modulation), decoding), read

    @torch.no_grad()
    def generate_answers(
        self, questions: list[str], prefix, decoding: DecodingConfig | None = None, prompt_template: str | None = None
    ) -> list[str]:
        """Answer each question with an already computed prefix (``prefix(modulation(...))``; None: none)."""
        return self.generate([self.prompt_ids(q, prompt_template) for q in questions], prefix, decoding)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], prefix=None, decoding: DecodingConfig | None = None) -> list[str]:
        """Token ids of each prompt (and a prefix, or None) -> the LLM's one-line continuation of each."""
        decoding = decoding or DecodingConfig()
        # Prompts that start alike (a few-shot prompt's worked examples) run their common start once.
        shared = shared_length(prompts) if prefix is None and decoding.strategy == "greedy" and len(prompts) > 1 else 0
        shared = shared if shared >= SHARED_START_TOKENS else 0
        rests = [p[shared:] for p in prompts]
        ids = pad(rests, self.tokenizer.pad_token_id, side="left")
        mask = pad([[1] * len(p) for p in rests], 0, side="left")
        ids = torch.cat([torch.tensor(prompts[0][:shared], dtype=ids.dtype).expand(len(prompts), -1), ids], 1)
        mask = torch.cat([mask.new_ones(len(prompts), shared), mask], 1)
        if self._first_line is None:
            self._first_line = FirstLine(self.tokenizer, self.llm.get_output_embeddings().weight.shape[0])
        eos = self.tokenizer.eos_token_id
        ids, mask = ids.to(self.device), mask.to(self.device)
        tokens = generate(self.llm, self.layout, ids, mask, prefix, eos, decoding, self._first_line, shared)
        # Answers are one line: a model that runs on (a few-shot prompt's next "Question:") is cut there.
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip().split("\n")[0].strip() for t in tokens]

    # ---- sizes -------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}

    def bytes_per_document(self) -> dict[str, float]:
        """Bank bytes per stored document: MBC as bit-packed on disk, MAC as float32 vectors."""
        k, dim = self.config.num_slots, self.layout.hidden_size
        return {
            "mbc": packed_size(k * self.config.codebook_stages, self.config.codebook_size),
            "mac": k * dim * 4,
            "codebook_total": self.config.codebook_stages * self.config.codebook_size * dim * 4,
            "retrieval_key": packed_size(self.config.retrieval_subspaces, self.config.retrieval_codes)
            if self.retrieval_keys is not None
            else 0,
        }

    # ---- checkpoints ---------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: every trainable tensor and the codebook usage statistics; the
        frozen backbones are named in the config instead."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {
            name: tensor.detach().cpu().contiguous().clone()
            for name, tensor in self.state_dict().items()
            if name in trainable
            or name.startswith(("quantizer.", "modulation_norm.", "retrieval_keys."))
            or ".slot_norm." in name
        }

    def codebook_fingerprint(self) -> str | None:
        """Hash of everything that fixes what a stored index means: the codebooks, the slot
        normalisation statistics the indices were computed under and the retrieval keys'
        centroids. None in MAC mode."""
        return self.bank_fingerprint() if self.codec.mode == "mbc" else None

    def bank_layout(self) -> BankLayout:
        """What this model's bank entries are: its codec's mode, K x stages, and its retrieval keys."""
        config = self.config
        keys = (config.retrieval_subspaces, config.retrieval_codes) if config.retrieval_top_k else (0, 0)
        return BankLayout(
            self.codec.mode,
            config.num_slots,
            config.codebook_stages,
            config.codebook_size,
            self.layout.hidden_size,
            self.bank_fingerprint(),
            *keys,
        )

    def bank_fingerprint(self) -> str:
        """What a stored bank entry's meaning depends on: the codebook (MBC), or the whole
        amortization network that made the float vectors (MAC), and the retrieval keys' centroids."""
        keys = [self.retrieval_keys.centroids] if self.retrieval_keys is not None else []
        return fingerprint(self.codec.meaning(self) + keys)

    def save_pretrained(self, folder: str | Path) -> None:
        checkpoint.save(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "MBCModel":
        model = cls.build(checkpoint.read_config(folder))
        checkpoint.load_state(model, folder)
        return model.to(device)

    def load_trainable_state(self, folder: str | Path) -> None:
        """Load a checkpoint's trainable tensors into this model, checking names and codebook fingerprint."""
        checkpoint.load_state(self, folder)

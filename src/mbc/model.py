"""MBC: a frozen LLM answering from a codebook-compressed memory of amortized documents.

document --AmortizationNetwork--> K vectors --codec (codebook)--> K code indices (the bank)
question --question network--> K queries --Aggregator over the decoded bank--> modulation
          (with retrieval keys, over only the question's top-k documents: network/retrieval.py)
modulation --PrefixExpansion--> past keys/values --frozen LLM with KV-LoRA--> answer

With ``codebook="vocabulary"`` the codes are the base LLM's own token ids (network/vocabulary.py),
and with ``code_reading="input"`` the LLM reads them as tokens before the question instead of
through aggregation and a prefix (``input_reading_loss``, ``code_prompts``).

``MBCModel`` composes a ``FrozenLLM`` (network/frozen_llm.py: tokenizer, prompts, KV-LoRA, the QA
loss, generation) and, with ``retrieval_top_k``, ``RetrievalKeys`` (network/retrieval.py); it owns
the pieces and the method's three uses of them: ``forward`` (the paper's
meta-training loss on a batch of documents, questions and answers; the batch's documents form the
bank), ``compress`` (documents -> bank entries) and, with a reader over a bank (memory/readers.py),
answering. Training schedules (warm starts, curricula) live in mbc.training, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from mbc import checkpoint
from mbc.bank import BankLayout
from mbc.bank.packing import packed_size
from mbc.config import MBCConfig
from mbc.errors import MBCError
from mbc.network import backbones
from mbc.network.aggregation import Aggregator
from mbc.network.amortization import AmortizationNetwork, SlotNorm
from mbc.network.backbones import Backbone
from mbc.network.codebook import ResidualQuantizer, fingerprint
from mbc.network.codecs import CodebookCodec, CodedVocabularyCodec, FloatCodec, PrefixCode
from mbc.network.decoding import DecodingConfig
from mbc.network.frozen_llm import IGNORE, FrozenLLM, lower_hidden, pad  # noqa: F401 (IGNORE, pad: what training imports from here)
from mbc.network.lexical import bm25, combined, lexical_rows
from mbc.network.pointer import TokenPointer
from mbc.network.prefix import PrefixExpansion
from mbc.network.retrieval import RetrievalKeys
from mbc.network.vocabulary import VocabularyStage
from mbc.prompts import ids_around_context


class PointerStates(NamedTuple):
    ids: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor

    def rows(self, rows: list[int]) -> "PointerStates":
        """The states of these documents of the batch."""
        return PointerStates(self.ids[rows], self.mask[rows], self.hidden[rows])

    def tokens(self) -> list[list[int]]:
        """Each document's token ids, without the padding."""
        return [row[: int(n)] for row, n in zip(self.ids.tolist(), self.mask.sum(1).tolist())]


@dataclass
class MBCOutput:
    loss: torch.Tensor  # qa_loss + vq_weight * vq_loss
    qa_loss: torch.Tensor
    vq_loss: torch.Tensor
    perplexity: torch.Tensor  # codebook perplexity of this batch (0 in MAC mode)


class MBCModel(nn.Module):
    def __init__(
        self,
        config: MBCConfig,
        llm: FrozenLLM,
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
        self.llm = llm
        self.document_tokenizer, self.question_tokenizer = document_encoder.tokenizer, question_encoder.tokenizer
        for name, encoder in (("max_document_tokens", document_encoder), ("max_question_tokens", question_encoder)):
            window = getattr(encoder.model.config, "max_position_embeddings", None)  # None: relative positions (T5)
            if window and getattr(config, name) > window:
                raise MBCError(
                    f"{name}={getattr(config, name)} is more than {encoder.name}'s window of {window} tokens"
                )

        dim = self.llm.layout.hidden_size
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
            first_stage = None
            if config.codebook == "vocabulary":
                first_stage = VocabularyStage(llm.model.get_input_embeddings(), config.beta, config.codebook_metric)
            self.quantizer = ResidualQuantizer(
                config.codebook_stages,
                first_stage,
                num_codes=config.codebook_size,
                dim=dim,
                beta=config.beta,
                ema_decay=config.ema_decay,
                dead_threshold=config.dead_threshold,
                metric=config.codebook_metric,
                update=config.codebook_update,
            )
            self.codec = CodebookCodec(self.quantizer, self.quantizer.num_codes, config.codebook_stages)
        self.prefix_code = None
        if config.code_entry_bytes is not None:  # fitted on the training documents (fit_code)
            self.prefix_code = PrefixCode(len(llm.tokenizer))
            self.codec = CodedVocabularyCodec(
                self.codec, self.prefix_code, config.code_entry_bytes, config.index_entry_bytes
            )
        self.pointer = None
        if config.code_pointer:
            if config.pointer_layer > self.llm.layout.num_layers:
                raise MBCError(
                    f"pointer_layer={config.pointer_layer} but the base LLM has only {self.llm.layout.num_layers} layers"
                )
            places = (config.num_slots, config.max_document_tokens) if config.pointer_positions else None
            self.pointer = TokenPointer(
                dim,
                self.llm.layout.hidden_size,
                positions=places,
                placement=config.pointer_placement,
                copy=config.pointer_copy,
            )
        self.aggregator = Aggregator(
            dim, config.aggregator_blocks, config.aggregator_heads, config.aggregator_head_dim, config.aggregator_output
        )
        self.retrieval_keys = None
        if config.retrieval_top_k:
            if key_encoder is None:
                raise MBCError(
                    "retrieval_top_k > 0 needs a frozen encoder for the retrieval keys (MBCModel.build loads one)"
                )
            self.retrieval_keys = RetrievalKeys.from_config(config, key_encoder)
        # Standardised across questions (as SlotNorm does for documents): the prefix then sees how
        # this question and bank differ from others, not a large shared constant (docs/JOURNAL.md).
        self.modulation_norm = SlotNorm(config.num_slots, dim) if config.standardize_modulation else None
        self.prefix_expansion = PrefixExpansion(
            config.num_slots,
            dim,
            config.prefix_tokens,
            self.llm.prefix_layers,
            self.llm.layout.num_kv_heads,
            self.llm.layout.head_dim,
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
            FrozenLLM.from_config(config),
            document_encoder,
            question_encoder,
            key_encoder,
        )

    @property
    def device(self) -> torch.device:
        return self.prefix_expansion.mix.device

    # ---- text -> tensors -------------------------------------------------------------------
    def _encode_text(self, tokenizer, texts: list[str], max_tokens: int):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    # ---- the pieces ------------------------------------------------------------------------
    def document_tokens(self, documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode_text(self.document_tokenizer, documents, self.config.max_document_tokens)

    def question_tokens(self, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode_text(self.question_tokenizer, questions, self.config.max_question_tokens)

    def amortize(self, documents: list[str], states: PointerStates | None = None) -> torch.Tensor:
        """Documents -> context vectors [N, K, dim] (before quantization); ``states``: their
        ``pointer_states``, where the caller already has them."""
        slots = self.amortization(*self.document_tokens(documents))
        if self.pointer is not None and states is None:
            states = self.pointer_states(documents)
        return self.point(slots, states)

    def pointer_states(self, documents: list[str], lower=None) -> PointerStates:
        """What the pointer points at: each document's LLM token ids and mask [N, T] (right-padded)
        and the frozen LLM's hidden states entering ``pointer_layer`` [N, T, d]; ``lower(ids,
        mask)``, where given, makes those hidden states (a cache of them, training/activations.py)."""
        ids, mask = self._encode_text(self.llm.tokenizer, documents, self.config.max_document_tokens)
        with torch.no_grad():
            hidden = (lower or self.pointer_hidden)(ids, mask)
        return PointerStates(ids, mask, hidden)

    def pointer_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return lower_hidden(self.llm.model, self.llm.layout, ids, mask, self.config.pointer_layer)

    def point(self, slots: torch.Tensor, states: PointerStates | None) -> torch.Tensor:
        """With ``code_pointer``: the amortization network's slots [N, K, dim] -> each a mix of its
        document's own token codes plus a residual (network/pointer.py); without, the slots."""
        if self.pointer is None:
            return slots
        return self.pointer(slots, states.hidden, self.quantizer.stages[0].decode(states.ids), states.mask)

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
        if self.reads_input:
            qa_loss = self.input_reading_loss(questions, answers, memory, question_documents, documents=documents)
            return MBCOutput(
                qa_loss + self.config.vq_weight * memory.vq_loss, qa_loss, memory.vq_loss, memory.perplexity
            )
        modulation = self.training_modulation(questions, documents, memory.vectors, question_documents)
        qa_loss = self.llm.qa_loss(questions, answers, self.prefix(modulation))
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

    def _training_reads(
        self, questions: list[str], documents: list[str], own: list[int], ranked: bool = False
    ) -> torch.Tensor:
        """[B, k] batch documents each question reads: its own and the k - 1 best-keyed others, its
        own first, or with ``ranked`` all in the order of their keys' scores (as a bank is read)."""
        own_index = torch.tensor(own, device=self.device)[:, None]
        k = min(self.config.retrieval_top_k, len(documents))
        if k == 1:
            return own_index
        scores = self.retrieval_keys.scores(questions, self.retrieval_keys.keys_of(documents))
        chosen = scores.scatter(1, own_index, float("inf")).topk(k, dim=1).indices
        if ranked:
            chosen = chosen.gather(1, scores.gather(1, chosen).argsort(1, descending=True))
        return chosen

    # ---- input-side reading (code_reading="input"): codes as tokens before the question ------
    @property
    def reads_input(self) -> bool:
        return self.config.code_reading == "input"

    def input_reading_loss(
        self,
        questions: list[str],
        answers: list[str],
        memory,
        own: list[int] | None,
        filled: list[int] | None = None,
        documents: list[str] | None = None,
    ) -> torch.Tensor:
        """The QA loss of each question asked after its own document's codes (``memory``, a training
        batch's ``TrainingMemory``; ``own[i]``: question i's document), the codes entering as their
        tokens' input embeddings with the vectors' gradients passed straight through. Only the codes
        the document's entry will hold are read (``filled``: ``filled_slots``; the codec's ``kept``).
        With ``retrieval_top_k`` = k > 1 and the batch's ``documents``, a question reads the codes of
        its own and the k - 1 best-keyed other documents, in their keys' order as ``code_prompts``
        reads a bank: a reader trained on its own document alone is misled by a second one."""
        if own is None:
            raise MBCError("input-side reading trains each question on its own document: pass question_documents")
        ids = memory.indices[..., 0]
        embeddings = self.quantizer.stages[0].to_embeddings(memory.vectors, ids)
        lengths = [len(row) for row in self.codec.kept(ids.tolist(), filled)]
        befores, afters = zip(*(ids_around_context(self.llm.tokenizer, q) for q in questions))
        answer_ids = [self.llm.answer_ids(a) for a in answers]
        reads = [[d] for d in own]
        if documents is not None:
            reads = self._training_reads(questions, documents, own, ranked=True).tolist()
        read = [torch.cat([embeddings[d, : lengths[d]] for d in row]) for row in reads]
        return self.llm.loss_around(read, list(befores), list(afters), answer_ids)

    def filled_slots(self, states: PointerStates | None) -> list[int] | None:
        """How many of the K slots each document fills: with ``pointer_copy`` a document of fewer
        tokens than K leaves the last slots uncovered (network/pointer.py); otherwise all (None)."""
        if states is None or self.pointer is None or not self.pointer.copy:
            return None
        return states.mask.sum(1).clamp(max=self.config.num_slots).long().tolist()

    def code_prompts(self, reader, questions: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Each question's prompt: its top documents' token ids (``retrieval_top_k``, best first)
        as the context of the token memory's worked-example prompt (prompts.py), which teaches the
        untrained LLM the answer format; and the bank ids read."""
        read = reader.top_ids(questions)
        entries = iter(self.codec.token_ids(reader.bank.entries([i for ids in read for i in ids])))  # one read
        codes = [[token for _ in ids for token in next(entries)] for ids in read]  # best first
        around = [ids_around_context(self.llm.tokenizer, q) for q in questions]
        return [before + c + after for c, (before, after) in zip(codes, around)], read

    def fit_code(self, documents: list[str]) -> None:
        """The prefix code of ``code_entry_bytes`` (network/codecs.py), fitted on these training
        documents' LLM token ids, as the token memory's."""
        self.prefix_code.fit(self.llm_token_ids(documents))

    def llm_token_ids(self, documents: list[str]) -> list[list[int]]:
        """Each document's LLM token ids, as the pointer reads them (cut at ``max_document_tokens``)."""
        ids, mask = self._encode_text(self.llm.tokenizer, documents, self.config.max_document_tokens)
        return PointerStates(ids, mask, None).tokens()

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

    # ---- retrieval keys (network/retrieval.py) -------------------------------------------------
    def stored_keys(self, bank, ids: list[int]) -> torch.Tensor:
        """What a reader keeps of each stored document to choose among them (``top_documents``'s
        ``document_keys``): its retrieval key [n, subspaces], and with ``lexical_weight`` its first
        stage's token ids after it [n, subspaces + K] (and its index's rare tokens after those)."""
        keys = torch.as_tensor(bank.retrieval_keys(ids)).long()
        if not self.config.lexical_weight:
            return keys
        width = self.config.num_slots + self.codec.index_width
        return lexical_rows(keys, self.codec.lexical_ids(bank.entries(ids)), width, pad=-1)

    @torch.no_grad()
    def top_documents(self, questions: list[str], document_keys) -> torch.Tensor:
        """[B, k] positions in ``document_keys`` (``stored_keys``) of each question's best-scored
        documents: by retrieval key, plus ``lexical_weight`` x BM25 over the stored token ids."""
        if not self.config.lexical_weight:
            return self.retrieval_keys.top(questions, document_keys, self.config.retrieval_top_k)
        subspaces = self.retrieval_keys.quantizer.subspaces
        scores = self.retrieval_keys.scores(questions, document_keys[:, :subspaces])
        asked = self.llm.tokenizer(questions, add_special_tokens=False)["input_ids"]
        lexical = bm25(asked, document_keys[:, subspaces:], pad=-1)
        scores = combined(scores, lexical, self.config.lexical_weight)
        return scores.topk(min(self.config.retrieval_top_k, scores.shape[1]), dim=1).indices

    # ---- the bank ----------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, documents: list[str]) -> np.ndarray:
        """Documents -> bank entries: code indices [N, K, stages] as the smallest unsigned type
        (MBC), or the float vectors [N, K, dim] as float32 (MAC mode)."""
        states = self.pointer_states(documents) if self.pointer is not None else None
        contexts, filled = self.amortize(documents, states), self.filled_slots(states)
        if self.config.index_entry_bytes:  # the index holds the document's rarest other tokens
            return self.codec.encode(contexts, filled, states.tokens())
        return self.codec.encode(contexts, filled)

    def memory(self, entries: np.ndarray) -> torch.Tensor:
        """Bank entries (as ``compress`` returns them) -> every stored vector, [N*K, dim]."""
        entries = torch.as_tensor(np.asarray(entries), device=self.device)
        return self.codec.decode(entries).reshape(-1, self.llm.layout.hidden_size)

    # ---- answering (from a bank: memory/readers.py) -------------------------------------------
    @torch.no_grad()
    def answer(self, questions: list[str], memory: torch.Tensor, decoding: DecodingConfig | None = None) -> list[str]:
        """Answer each question from a memory [M, dim] (``memory(entries)``) read whole."""
        if self.reads_input:
            raise MBCError("a model with code_reading 'input' reads one document's codes: answer through a reader")
        return self.llm.answer(questions, self.prefix(self.modulation(questions, memory)), decoding)

    @torch.no_grad()
    def answer_read(self, reader, questions: list[str], decoding: DecodingConfig | None = None):
        """Each question answered from what a reader over a bank (memory/readers.py) gives it; and
        the bank ids of the documents each read (None: the whole bank)."""
        answers, _, read = self.answer_and_loss(reader, questions, None, decoding)
        return answers, read

    @torch.no_grad()
    def answer_and_loss(
        self, reader, questions: list[str], answers: list[str] | None, decoding: DecodingConfig | None = None
    ):
        """``answer_read``'s answers and bank ids, and with ``answers`` the QA loss on them
        (teacher-forced), from one reading of the bank (validation needs both)."""
        if self.reads_input:
            prompts, read = self.code_prompts(reader, questions)
            loss = None
            if answers is not None:
                loss = self.llm.prompts_loss(prompts, [self.llm.answer_ids(a) for a in answers])
            return self.llm.generate(prompts, None, decoding), loss, read
        modulation, read = reader.read(questions)
        prefix = self.prefix(modulation)
        loss = self.llm.qa_loss(questions, answers, prefix) if answers is not None else None
        return self.llm.answer(questions, prefix, decoding), loss, read

    # ---- sizes -------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}

    def bytes_per_document(self) -> dict[str, float]:
        """Bank bytes per stored document: MBC as bit-packed on disk, MAC as float32 vectors."""
        k, dim = self.config.num_slots, self.llm.layout.hidden_size
        stages, codes = self.config.codebook_stages, self.config.codebook_size
        if self.quantizer is not None:  # a vocabulary stage's codes are the LLM's: more of them, none stored here
            codes, learned = self.quantizer.num_codes, self.quantizer.learned_codes()
        else:
            learned = stages * codes
        stored = packed_size(k * stages, codes) if self.prefix_code is None else self.codec.entry_bytes
        return {
            "mbc": stored,
            "mac": k * dim * 4,
            "codebook_total": learned * dim * 4,
            "retrieval_key": self.retrieval_keys.bytes_per_document() if self.retrieval_keys is not None else 0,
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
            or name.startswith(("quantizer.", "modulation_norm.", "retrieval_keys.quantizer.", "prefix_code."))
            or ".slot_norm." in name
        }

    def codebook_fingerprint(self) -> str | None:
        """Hash of everything that fixes what a stored index means: the codebooks, the slot
        normalisation statistics the indices were computed under and the retrieval keys'
        centroids. None in MAC mode."""
        return self.bank_fingerprint() if self.codec.mode != "mac" else None

    def bank_layout(self) -> BankLayout:
        """What this model's bank entries are: its codec's mode, K x stages, and its retrieval keys."""
        config = self.config
        keys = (config.retrieval_subspaces, config.retrieval_codes) if config.retrieval_top_k else (0, 0)
        return BankLayout(
            self.codec.mode,
            config.num_slots if self.prefix_code is None else self.codec.entry_bytes,
            config.codebook_stages,
            config.codebook_size if self.codec.mode == "mac" else self.codec.codebook_size,
            self.llm.layout.hidden_size,
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

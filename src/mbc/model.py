"""MBC: a frozen LLM answering from a codebook-compressed memory of amortized documents.

document --AmortizationNetwork--> K vectors --ResidualQuantizer--> K code indices (the bank)
question --question network--> K queries --Aggregator over the decoded bank--> modulation
          (optionally over only the top-k documents by their stored retrieval keys: retrieval.py)
modulation --PrefixExpansion--> past keys/values --frozen LLM with KV-LoRA--> answer

``MBCModel`` owns the pieces and the three uses of them: ``forward`` (one meta-training step's
loss on a batch of documents, questions and answers; the batch's documents form the bank),
``compress`` (documents -> bank entries) and ``answer`` (questions + bank -> text).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import backbones
from .aggregation import Aggregator
from .amortization import AmortizationNetwork, SlotNorm
from .backbones import Backbone
from .codebook import ResidualQuantizer, fingerprint
from .config import MBCConfig
from .decoding import DecodingConfig, generate
from .errors import MBCError
from .llm_layout import describe_llm
from .lora import add_kv_lora, lora_disabled
from .packing import index_dtype, packed_size
from .prefix import PrefixExpansion, enable_prefix_attention, prefix_in
from .retrieval import ProductQuantizer, SentenceEmbedder

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "mbc_config.json"
IGNORE = -100  # label of tokens that carry no loss (the prompt, padding)


PROBE_TOKENS = ("first", "all")


@dataclass
class MBCOutput:
    loss: torch.Tensor  # qa_loss (or probe_loss) + vq_weight * vq_loss
    qa_loss: torch.Tensor  # 0 under the probe objective
    vq_loss: torch.Tensor
    perplexity: torch.Tensor  # codebook perplexity of this batch (0 in MAC mode)
    probe_loss: torch.Tensor  # the answer probe (objective="probe"), else 0


def pad(sequences: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in sequences)
    filler = [[value] * (width - len(s)) for s in sequences]
    rows = [f + s if side == "left" else s + f for s, f in zip(sequences, filler)]
    return torch.tensor(rows, dtype=torch.long)


class MBCModel(nn.Module):
    def __init__(self, config: MBCConfig, llm: Backbone, document_encoder: Backbone, question_encoder: Backbone,
                 key_encoder: Backbone | None = None):
        super().__init__()
        self.config = config
        self.names = {"llm": llm.name, "document_encoder": document_encoder.name, "question_encoder": question_encoder.name}
        self.llm, self.tokenizer = llm.model, llm.tokenizer
        self.document_tokenizer, self.question_tokenizer = document_encoder.tokenizer, question_encoder.tokenizer
        self.layout = describe_llm(self.llm)
        self.prefix_layers = config.prefix_layers or self.layout.num_layers
        for name, layers in (("prefix_layers", self.prefix_layers), ("lora_layers", config.lora_layers)):
            if layers > self.layout.num_layers:
                raise MBCError(f"{name}={layers} but the base LLM has only {self.layout.num_layers} layers")
        if self.tokenizer.eos_token_id is None:
            raise MBCError(f"the tokenizer of '{llm.name}' has no EOS token, which answers must end with")

        self.llm.requires_grad_(False)
        self.llm.eval()  # frozen: no dropout inside the base model
        add_kv_lora(self.layout, config.lora_layers, config.lora_rank, config.lora_alpha, config.lora_dropout)
        enable_prefix_attention(self.llm)

        dim = self.layout.hidden_size
        norms = ("slot", "layer") if config.standardize_slots else (None, None)
        self.amortization = AmortizationNetwork(document_encoder.model, config.num_slots, dim, config.reader_blocks,
                                                config.train_encoders, output_norm=norms[0])
        self.question_network = AmortizationNetwork(question_encoder.model, config.num_slots, dim, config.reader_blocks,
                                                    config.train_encoders, output_norm=norms[1])
        self.quantizer = (
            ResidualQuantizer(config.codebook_stages, num_codes=config.codebook_size, dim=dim, beta=config.beta,
                              ema_decay=config.ema_decay, dead_threshold=config.dead_threshold,
                              metric=config.codebook_metric, update=config.codebook_update)
            if config.quantize else None
        )
        # Set by training's float-memory warm start (TrainConfig.float_memory_steps): the bank holds
        # the encoder's float vectors, as MAC's does, until the codebook is fitted to them.
        self.codebook_bypassed = False
        self.aggregator = Aggregator(dim, config.aggregator_blocks, config.aggregator_heads, config.aggregator_head_dim, config.aggregator_output)
        self.embedder = self.retrieval_keys = None
        if config.retrieval_top_k:
            if key_encoder is None:
                raise MBCError("retrieval_top_k > 0 needs a frozen encoder for the retrieval keys (MBCModel.build loads one)")
            self.embedder = SentenceEmbedder(key_encoder.model, key_encoder.tokenizer, config.max_document_tokens)
            self.retrieval_keys = ProductQuantizer(self.embedder.dim, config.retrieval_subspaces, config.retrieval_codes)
        # Standardised across questions (as SlotNorm does for documents): the prefix then sees how
        # this question and bank differ from others, not a large shared constant (docs/RESULTS.md).
        self.modulation_norm = SlotNorm(config.num_slots, dim) if config.standardize_modulation else None
        self.prefix_expansion = PrefixExpansion(
            config.num_slots, dim, config.prefix_tokens, self.prefix_layers,
            self.layout.num_kv_heads, self.layout.head_dim, config.prefix_hidden or dim,
        )

    @classmethod
    def build(cls, config: MBCConfig | None = None) -> "MBCModel":
        """A fresh (untrained) model over the backbones the config names."""
        config = config or MBCConfig()
        document_encoder = backbones.load_encoder(config.document_encoder)
        question_encoder = (
            document_encoder if config.question_encoder == config.document_encoder and not config.train_encoders
            else backbones.load_encoder(config.question_encoder)
        )
        # The retrieval keys' encoder stays the pretrained one: a trained copy would change what stored keys mean.
        key_encoder = None
        if config.retrieval_top_k:
            key_encoder = document_encoder if not config.train_encoders else backbones.load_encoder(config.document_encoder)
        return cls(config, backbones.load_llm(config.llm, config.llm_quantization), document_encoder, question_encoder, key_encoder)

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
        return self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def training_inputs(self, questions: list[str], answers: list[str]):
        """Prompt + answer + EOS, right-padded; labels are IGNORE everywhere but the answer tokens."""
        prompts = [self.prompt_ids(q) for q in questions]
        targets = [self.answer_ids(a) for a in answers]
        ids = pad([p + t for p, t in zip(prompts, targets)], self.tokenizer.pad_token_id)
        labels = pad([[IGNORE] * len(p) + t for p, t in zip(prompts, targets)], IGNORE)
        mask = pad([[1] * (len(p) + len(t)) for p, t in zip(prompts, targets)], 0)
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    # ---- the pieces ------------------------------------------------------------------------
    def amortize(self, documents: list[str]) -> torch.Tensor:
        """Documents -> context vectors [N, K, dim] (before quantization)."""
        return self.amortization(*self._encode_text(self.document_tokenizer, documents, self.config.max_document_tokens))

    def queries(self, questions: list[str]) -> torch.Tensor:
        return self.question_network(*self._encode_text(self.question_tokenizer, questions, self.config.max_question_tokens))

    def modulation(self, questions: list[str], memory: torch.Tensor, memory_log_weight: torch.Tensor | None = None,
                   memory_mask: torch.Tensor | None = None, document_keys=None) -> torch.Tensor:
        """Questions and a memory [M, dim] (every vector of the bank, document after document) ->
        modulation [B, K, dim]. ``memory_mask`` [B, M] (True = visible) gives each question its own
        part of the bank. A model with retrieval keys reads each question's top-k documents only,
        chosen by ``document_keys`` (``retrieval_keys_of`` the documents, in the memory's order)."""
        queries = self.queries(questions)
        if self.retrieval_keys is not None:
            if memory_log_weight is not None or memory_mask is not None:
                raise MBCError("a model with retrieval_top_k > 0 reads whole documents: it takes no memory weights or masks")
            if document_keys is None:
                raise MBCError("a model with retrieval_top_k > 0 needs the bank's retrieval keys (document_keys=) "
                               "to choose each question's documents")
            documents = memory.view(len(document_keys), -1, memory.shape[-1])
            return self.read_documents(queries, documents[self.top_documents(questions, document_keys)])
        log_weight = None if memory_log_weight is None else memory_log_weight[None]
        return self.aggregator(queries, memory[None], memory_mask=memory_mask, memory_log_weight=log_weight)

    def read_documents(self, queries: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Queries [B, K, dim] and each question's chosen documents' vectors [B, k, K, dim] -> modulation."""
        return self.aggregator(queries, chosen.flatten(1, 2))

    def prefix(self, modulation: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.modulation_norm is not None:
            modulation = self.modulation_norm(modulation)
        return self.prefix_expansion(modulation)

    # ---- training --------------------------------------------------------------------------
    def forward(self, documents: list[str], questions: list[str], answers: list[str], backprop_keep: float = 1.0,
                question_documents: list[int] | None = None, bank_size: int | None = None, objective: str = "qa",
                probe_tokens: str = "first", probe_weight: float = 0.0) -> MBCOutput:
        """One meta-training loss: the batch's documents form the bank every question reads.

        ``backprop_keep`` < 1 is the reference's "backprop dropout": only that fraction of the
        documents is amortized with gradients, the rest under no_grad, to save memory.
        ``bank_size`` (with ``question_documents``, the index of each question's own document)
        lets each question see only its own document and ``bank_size - 1`` others of the batch:
        a curriculum that starts with the easy problem (read the right document) before the
        full one (find it among many). With retrieval keys (``question_documents`` required) each
        question reads its own document and the k - 1 others of the batch its key scores highest,
        as answering from a bank will.

        ``objective="probe"`` replaces the QA loss by ``answer_probe_loss`` over ``probe_tokens``
        (no LLM pass): training's probe warm start (TrainConfig.probe_steps). Under the QA
        objective, ``probe_weight`` > 0 adds that much of the probe loss (TrainConfig.probe_weight),
        so that the document side keeps carrying the answer while the LLM side learns to read it."""
        memory, vq_loss, perplexity = self.training_memory(self._amortize_some_with_grad(documents, backprop_keep))
        if self.retrieval_keys is not None:
            if question_documents is None:
                raise MBCError("training with retrieval_top_k > 0 needs question_documents (each question's own document)")
            chosen = self._training_reads(questions, documents, question_documents)
            modulation = self.read_documents(self.queries(questions), memory[chosen])
        else:
            mask = None
            if bank_size is not None and question_documents is not None and bank_size < len(documents):
                mask = self._bank_mask(question_documents, len(documents), bank_size)
            modulation = self.modulation(questions, memory.reshape(-1, memory.shape[-1]), memory_mask=mask)
        if objective == "probe":
            probe_loss = self.answer_probe_loss(modulation, answers, probe_tokens) + self._llm_side_in_graph()
            return MBCOutput(probe_loss + self.config.vq_weight * vq_loss, probe_loss.new_zeros(()), vq_loss, perplexity, probe_loss)
        if objective != "qa":
            raise MBCError(f"objective must be 'qa' or 'probe', got {objective!r}")
        qa_loss = self.qa_loss(questions, answers, self.prefix(modulation))
        probe_loss = self.answer_probe_loss(modulation, answers, probe_tokens) if probe_weight > 0 else qa_loss.new_zeros(())
        loss = qa_loss + probe_weight * probe_loss + self.config.vq_weight * vq_loss
        return MBCOutput(loss, qa_loss, vq_loss, perplexity, probe_loss)

    def answer_probe_logits(self, modulation: torch.Tensor, tokens: str = "first") -> torch.Tensor:
        """The modulation [B, K, dim] read through the LLM's frozen output embedding after a
        LayerNorm, a logit lens. ``first``: its mean over the K vectors -> [B, vocab], for the
        answer's first token; ``all``: each vector -> [B, K, vocab], vector k for answer token k."""
        if tokens not in PROBE_TOKENS:
            raise MBCError(f"probe tokens must be one of {PROBE_TOKENS}, got {tokens!r}")
        read = modulation.mean(1) if tokens == "first" else modulation
        return self.llm.get_output_embeddings()(F.layer_norm(read, read.shape[-1:]))

    def answer_probe_loss(self, modulation: torch.Tensor, answers: list[str], tokens: str = "first") -> torch.Tensor:
        """Cross-entropy of the answer's tokens under ``answer_probe_logits``: its first token, or
        (``all``) its first K tokens, one per modulation vector. Why: the QA loss reaches the
        document side only through a prefix that starts at zero and a frozen LLM, and in CPU budgets
        the adapter learned answer priors long before it learned to look in its memory; the LLM
        side learns to read a memory that already carries the answer in about 100 steps
        (bench/reading_parts.py, docs/RESULTS.md)."""
        logits = self.answer_probe_logits(modulation, tokens).float()
        if tokens == "first":
            return F.cross_entropy(logits, torch.tensor([self.answer_ids(a)[0] for a in answers], device=logits.device))
        targets = pad([self.answer_ids(a)[:-1][: modulation.shape[1]] for a in answers], IGNORE).to(logits.device)
        return F.cross_entropy(logits[:, : targets.shape[1]].flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    def _llm_side_in_graph(self) -> torch.Tensor:
        """0 x every trainable parameter the probe does not use (prefix, KV-LoRA): multi-process
        training (DDP) needs every parameter in each step's graph."""
        reading = ("amortization.", "question_network.", "quantizer.", "aggregator.")
        return 0.0 * sum(p.sum() for name, p in self.named_parameters() if p.requires_grad and not name.startswith(reading))

    def training_memory(self, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Context vectors -> (what the bank holds in training, VQ loss, codebook perplexity): the
        straight-through codes (MBC), the vectors themselves (MAC, or MBC's float-memory warm start)."""
        if self.quantizer is None:
            return contexts, contexts.new_zeros(()), contexts.new_zeros(())
        quantized = self.quantizer(contexts)
        if self.codebook_bypassed:  # the codebook stays in the graph (every process must use every parameter)
            return contexts, 0.0 * quantized.loss, quantized.perplexity
        return quantized.quantized, quantized.loss, quantized.perplexity

    def _training_reads(self, questions: list[str], documents: list[str], own: list[int]) -> torch.Tensor:
        """[B, k] batch documents each question reads: its own first, then the best-keyed others."""
        own_index = torch.tensor(own, device=self.device)[:, None]
        k = min(self.config.retrieval_top_k, len(documents))
        if k == 1:
            return own_index
        scores = self.retrieval_keys.scores(self.embedder(questions), self.retrieval_keys_of(documents))
        scores.scatter_(1, own_index, float("inf"))
        return scores.topk(k, dim=1).indices

    def _bank_mask(self, question_documents: list[int], num_documents: int, bank_size: int) -> torch.Tensor:
        """[questions, documents * K]: each question sees its own document and bank_size - 1 random others."""
        visible = torch.zeros(len(question_documents), num_documents, dtype=torch.bool)
        for row, own in enumerate(question_documents):
            others = [d for d in torch.randperm(num_documents).tolist() if d != own][: bank_size - 1]
            visible[row, [own, *others]] = True
        return visible.repeat_interleave(self.config.num_slots, dim=1).to(self.device)

    def _amortize_some_with_grad(self, documents: list[str], keep: float) -> torch.Tensor:
        keep_count = max(1, round(keep * len(documents)))
        if keep_count >= len(documents) or not torch.is_grad_enabled():
            return self.amortize(documents)
        order = torch.randperm(len(documents))
        with_grad = self.amortize([documents[i] for i in order[:keep_count].tolist()])
        with torch.no_grad():
            without_grad = self.amortize([documents[i] for i in order[keep_count:].tolist()])
        return torch.cat([with_grad, without_grad])[torch.argsort(order)]  # back in the documents' order

    def qa_loss(self, questions: list[str], answers: list[str], prefix) -> torch.Tensor:
        """Mean negative log-likelihood of the answer tokens (+ EOS), as ``llm(labels=...).loss``
        computes it, but projecting onto the vocabulary only where an answer token is predicted:
        with short answers the projection of every prompt token was a fifth of a CPU step."""
        ids, mask, labels = self.training_inputs(questions, answers)
        with prefix_in(self.layout, prefix):
            hidden = self.llm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        predicted = targets != IGNORE
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][predicted]).float()
        return F.cross_entropy(logits, targets[predicted])

    @torch.no_grad()
    def fit_codebook(self, documents: list[str], batch_size: int = 64) -> None:
        """k-means initialisation of the codebook on these documents' vectors, amortized as the
        bank will store them (eval mode); ends the float-memory warm start."""
        mode = self.training
        self.eval()
        contexts = torch.cat([self.amortize(documents[i : i + batch_size]) for i in range(0, len(documents), batch_size)])
        self.train(mode)
        self.quantizer.fit(contexts)
        self.codebook_bypassed = False

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
        contexts = self.amortize(documents)
        if self.quantizer is None:
            return contexts.float().cpu().numpy()
        return self.quantizer.encode(contexts).cpu().numpy().astype(index_dtype(self.config.codebook_size))

    def memory(self, entries: np.ndarray) -> torch.Tensor:
        """Bank entries (as ``compress`` returns them) -> every stored vector, [N*K, dim]."""
        entries = torch.as_tensor(np.asarray(entries), device=self.device)
        if self.quantizer is None:
            return entries.float().reshape(-1, self.layout.hidden_size)
        if entries.shape[-1] != self.config.codebook_stages:
            raise MBCError(f"bank entries have {entries.shape[-1]} indices per vector; this codebook has {self.config.codebook_stages} stages")
        return self.quantizer.decode(entries.long()).reshape(-1, self.layout.hidden_size)

    # ---- answering ---------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, questions: list[str], memory: torch.Tensor | None, decoding: DecodingConfig | None = None,
               memory_log_weight: torch.Tensor | None = None, document_keys=None) -> list[str]:
        """Answer each question from a memory [M, dim] (``memory(entries)``; with retrieval keys,
        also ``document_keys``, the documents' ``retrieval_keys_of``)."""
        prefix = self.prefix(self.modulation(questions, memory, memory_log_weight, document_keys=document_keys))
        return self.generate_answers(questions, prefix, decoding)

    @torch.no_grad()
    def answer_without_memory(self, questions: list[str], prompt_template: str | None = None,
                              decoding: DecodingConfig | None = None) -> list[str]:
        """The base LLM alone: no prefix and KV-LoRA switched off (the no-adaptation baseline)."""
        with lora_disabled(self.llm):
            return self.generate_answers(questions, None, decoding, prompt_template)

    @torch.no_grad()
    def generate_answers(self, questions: list[str], prefix, decoding: DecodingConfig | None = None,
                         prompt_template: str | None = None) -> list[str]:
        """Answer each question with an already computed prefix (``prefix(modulation(...))``; None: none)."""
        return self._generate([self.prompt_ids(q, prompt_template) for q in questions], prefix, decoding)

    @torch.no_grad()
    def answer_prompts(self, prompts: list[str], decoding: DecodingConfig | None = None) -> list[str]:
        """The base LLM alone (no prefix, KV-LoRA off) continuing whole prompt texts: the baselines
        that put documents into the prompt."""
        with lora_disabled(self.llm):
            return self._generate([self.tokenizer(p)["input_ids"] for p in prompts], None, decoding)

    def _generate(self, prompts: list[list[int]], prefix, decoding: DecodingConfig | None) -> list[str]:
        ids = pad(prompts, self.tokenizer.pad_token_id, side="left").to(self.device)
        mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(self.device)
        tokens = generate(self.llm, self.layout, ids, mask, prefix, self.tokenizer.eos_token_id, decoding)
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
            "retrieval_key": packed_size(self.config.retrieval_subspaces, self.config.retrieval_codes) if self.retrieval_keys is not None else 0,
        }

    # ---- checkpoints ---------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: every trainable tensor and the codebook usage statistics; the
        frozen backbones are named in the config instead."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {
            name: tensor.detach().cpu().contiguous().clone()
            for name, tensor in self.state_dict().items()
            if name in trainable or name.startswith(("quantizer.", "modulation_norm.", "retrieval_keys.")) or ".slot_norm." in name
        }

    def codebook_fingerprint(self) -> str | None:
        """Hash of everything that fixes what a stored index means: the codebooks, the slot
        normalisation statistics the indices were computed under and the retrieval keys'
        centroids. None in MAC mode."""
        if self.quantizer is None:
            return None
        norm = self.amortization.slot_norm
        extra = [norm.running_mean, norm.running_std] if norm is not None else []
        return fingerprint(self.quantizer.tables() + extra + self._key_tables())

    def _key_tables(self) -> list[torch.Tensor]:
        return [self.retrieval_keys.centroids] if self.retrieval_keys is not None else []

    def bank_fingerprint(self) -> str:
        """What a stored bank entry's meaning depends on: the codebook (MBC), or the whole
        amortization network that made the float vectors (MAC)."""
        if self.quantizer is not None:
            return self.codebook_fingerprint()
        return fingerprint([t for _, t in sorted(self.amortization.state_dict().items())] + self._key_tables())

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"config": self.config.to_dict(), "codebook_fingerprint": self.codebook_fingerprint()}
        # Temporary names + os.replace: a crash mid-save leaves the previous checkpoint whole.
        save_file(self.trainable_state_dict(), folder / (WEIGHTS_NAME + ".tmp"), metadata={"format": "pt"})
        (folder / (CONFIG_NAME + ".tmp")).write_text(json.dumps(meta, indent=2))
        os.replace(folder / (WEIGHTS_NAME + ".tmp"), folder / WEIGHTS_NAME)
        os.replace(folder / (CONFIG_NAME + ".tmp"), folder / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "MBCModel":
        folder = Path(folder)
        if not (folder / CONFIG_NAME).exists():
            raise MBCError(f"{folder} is not an MBC checkpoint: {CONFIG_NAME} is missing (save one with save_pretrained)")
        meta = json.loads((folder / CONFIG_NAME).read_text())
        model = cls.build(MBCConfig.from_dict(meta["config"]))
        model.load_trainable_state(folder)
        return model.to(device)

    def load_trainable_state(self, folder: str | Path) -> None:
        """Load a checkpoint's trainable tensors into this model, checking names and codebook fingerprint."""
        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).exists():
                raise MBCError(f"{folder} is not an MBC checkpoint: {name} is missing (save one with save_pretrained)")
        state = load_file(folder / WEIGHTS_NAME)
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise MBCError(f"checkpoint {folder} does not match its config: missing {missing[:5]}, unexpected {extra[:5]}")
        self.load_state_dict(state, strict=False)
        if self.codebook_fingerprint() != json.loads((folder / CONFIG_NAME).read_text()).get("codebook_fingerprint"):
            raise MBCError(f"the codebook in {folder / WEIGHTS_NAME} does not match the fingerprint in {CONFIG_NAME}: the checkpoint is corrupted")

"""Token memory: each document kept as K of its own LLM token ids, read by the base LLM as text.

A memory variant beside MBC's (model.py), for the lever "a codebook the LLM can already read" at
its simplest. The codebook is the base LLM's own token table, so a 16-bit index names a token of
the document and the memory enters input-side, as text, where MBC's code vectors enter as a prefix
the adapter must learn to decode (and never learned to decode into a name or number):

    document --frozen LLM, hidden states entering `layer`--> a score per token --top K, in order--> K token ids (the bank)
    question --retrieval key (network/retrieval.py) + BM25 over the kept tokens (network/lexical.py)-->
    its top-1 document --> the kept tokens as the context of the worked-example prompt
    (prompts.py) --> frozen base LLM --> answer

Which tokens a document keeps is learned: a linear scorer reads each token's hidden state beside
its successor's (a causal LLM sees no right context), trained on the training documents to flag the
tokens of an answer to one of their questions, and the ``before`` tokens ahead of each answer (the
words that say what it is): seconds for the scorer, minutes for the frozen LLM's hidden states. A
reader may also be trained: the base LLM's KV-LoRA, to answer from kept tokens (fitting and the
reader: training/token_memory.py). A document shorter than K tokens is kept whole, padded with an index past the
vocabulary. Bytes per document: 2 per kept token plus the retrieval key. The kept tokens are also
the lexical half of choosing which document a question reads: a 32-byte key alone finds the own
SQuAD paragraph for ~60% of questions, the key and BM25 over the kept tokens for ~79%.
"""

from __future__ import annotations

from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Annotated, Literal, get_args

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mbc import checkpoint, prompts
from mbc.bank import BankLayout
from mbc.bank.packing import packed_size
from mbc.config import MBCConfig
from mbc.errors import MBCError, check_texts
from mbc.network.codebook import fingerprint
from mbc.network.codecs import CodedTokenCodec, PrefixCode, TokenCodec
from mbc.network.decoding import DecodingConfig
from mbc.network.frozen_llm import FrozenLLM, lower_hidden, pad
from mbc.network.lexical import bm25, combined, lexical_rows, standardised
from mbc.network.lora import lora_disabled
from mbc.network.retrieval import RetrievalKeys
from mbc.network.vocabulary import CodeWriter, VocabularyCodebook
from mbc.settings import Field, from_dict, settings

KIND = "token_memory"  # the checkpoint's "kind", which tells it from an MBC checkpoint
Codes = Literal["kept", "written"]
CODES = get_args(Codes)


def _cpu_preset() -> dict:
    from mbc.presets import preset

    return preset("cpu")["model"]


@settings
class TokenMemoryConfig:
    keep: Annotated[int, Field(ge=1)] = (
        48  # tokens kept per document (2 bytes each); chosen on validation (docs/RESULTS.md)
    )
    layer: Annotated[int, Field(ge=1)] = (
        20  # the scorer reads the LLM's hidden state entering this layer (SmolLM2: of 30)
    )
    # longer documents are stored as passages of this many LLM tokens
    max_document_tokens: Annotated[int, Field(ge=16)] = 512
    # Which document a question reads: its retrieval key's score plus this times BM25 over the kept
    # tokens, each standardised over the bank (0: the key alone). Chosen on SQuAD validation (docs/RESULTS.md).
    lexical_weight: Annotated[float, Field(ge=0)] = 0.3
    # Plus this times the question's sentence embedding against the kept tokens' (decoded as text),
    # which a reader computes from the stored codes: a dense score at no stored byte
    # (bench/token_retrieval.py). 0: left out, as every memory saved before the setting was read.
    embedding_weight: Annotated[float, Field(ge=0)] = 0.0
    # True: the base LLM's KV-LoRA was trained to answer from kept tokens (``train_reader``); False:
    # the base LLM reads them unchanged. Either reads them in the same worked-example prompt.
    trained_reader: bool = False
    # "kept": the bank holds the kept tokens themselves. "written": MBC's codebook step on the LLM's
    # vocabulary (network/vocabulary.py): each kept token's vector is rewritten by a trained layer and
    # stored as the id of the nearest token embedding, which may be a token the document lacks;
    # trained end to end on the QA loss (training/vocabulary_codes.py) and read by id, not as text.
    codes: Codes = "kept"
    commitment: Annotated[float, Field(ge=0)] = 0.25  # beta of the commitment term, for written codes
    # Store each document in this many bytes as kept tokens under a prefix code fitted on the
    # training documents (network/token_coding.py: ~11 bits a token instead of 16): as many of its
    # best-scored tokens as fit (``keep`` is then unused). None: ``keep`` token ids of 16 bits each.
    entry_bytes: Annotated[int | None, Field(ge=1, le=65536)] = None
    # The base LLM (its name, KV-LoRA and layers) and the retrieval keys (their encoder and sizes):
    # an MBC config, of which only those parts are used
    base: dict = field(default_factory=_cpu_preset)

    def __post_init__(self):
        if self.entry_bytes is not None and self.codes != "kept":
            raise MBCError("entry_bytes codes kept tokens; written codes are stored as token ids")
        if not self.base.get("retrieval_top_k"):
            raise MBCError(
                "a token memory reads its top-1 document by retrieval keys: its base needs retrieval_top_k > 0"
            )

    def to_dict(self) -> dict:
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "TokenMemoryConfig":
        values = {k: v for k, v in values.items() if k != "kind"}
        values.setdefault("lexical_weight", 0.0)  # saved before the setting: read by the key alone, as measured
        return from_dict(cls, values, "token memory config")


class TokenMemory(nn.Module):
    """The scorer (and with written codes the writer) over a frozen LLM, whose KV-LoRA is trained
    or read only by a trained reader, and the retrieval keys that choose what a question reads."""

    def __init__(self, config: TokenMemoryConfig, llm: FrozenLLM, retrieval_keys: RetrievalKeys):
        super().__init__()
        layout = llm.layout
        if not 1 <= config.layer <= layout.num_layers:
            raise MBCError(f"layer={config.layer} is outside the base LLM's {layout.num_layers} layers")
        self.config, self.llm, self.retrieval_keys = config, llm, retrieval_keys
        self.trained_on: str | None = None  # what training read, kept in its checkpoints (describe_training)
        self.scorer = nn.Linear(2 * layout.hidden_size, 1)
        self.codec = TokenCodec(len(llm.tokenizer), config.keep)
        self.prefix_code = None
        if config.entry_bytes is not None:  # fitted with the scorer (``fit_code``)
            self.prefix_code = PrefixCode(len(llm.tokenizer))
            self.codec = CodedTokenCodec(self.prefix_code, config.entry_bytes)
        self.writer = self.codebook = None
        if config.codes == "written":
            self.writer = CodeWriter(2 * layout.hidden_size, layout.hidden_size)
            self.codebook = VocabularyCodebook(llm.model.get_input_embeddings(), config.commitment)

    @classmethod
    def build(cls, config: TokenMemoryConfig | None = None) -> "TokenMemory":
        from mbc.network import backbones

        config = config or TokenMemoryConfig()
        base = MBCConfig.from_dict(config.base)
        key_encoder = backbones.load_encoder(base.document_encoder)
        return cls(config, FrozenLLM.from_config(base), RetrievalKeys.from_config(base, key_encoder)).eval()

    def keeping(self, keep: int) -> "TokenMemory":
        """The same memory keeping ``keep`` tokens per document (scorer and retrieval keys shared)."""
        other = TokenMemory(replace(self.config, keep=keep), self.llm, self.retrieval_keys)
        other.scorer, other.writer = self.scorer, self.writer
        if self.prefix_code is not None:
            other.prefix_code.lengths.copy_(self.prefix_code.lengths)
        return other.eval()

    def fit_code(self, documents: list[list[int]]) -> None:
        """The prefix code of ``entry_bytes`` memories, fitted on training documents' token ids."""
        self.prefix_code.fit(documents)

    @property
    def document_tokenizer(self):
        """What memory/service.py cuts long documents into passages by: the LLM's, whose tokens are kept."""
        return self.llm.tokenizer

    def stored_keys(self, bank, ids: list[int]) -> torch.Tensor:
        """What a reader keeps of each stored document: its retrieval key and its kept token ids,
        [n, subspaces + the codec's most tokens] (the second half a lexical index at no stored byte: network/lexical.py)."""
        kept = self.codec.decode(bank.entries(ids))
        return lexical_rows(bank.retrieval_keys(ids), kept, self.codec.most_tokens, self.codec.pad)

    @torch.no_grad()
    def top_documents(self, questions: list[str], document_keys) -> torch.Tensor:
        """[B, 1] the position in ``document_keys`` (``stored_keys``) of the document whose kept
        tokens each question reads: the best by retrieval key plus ``lexical_weight`` x BM25 over
        the kept tokens plus ``embedding_weight`` x the kept tokens' sentence embedding."""
        subspaces = self.retrieval_keys.quantizer.subspaces
        keys, tokens = document_keys[:, :subspaces], document_keys[:, subspaces:]
        scores = self.retrieval_keys.scores(questions, keys)
        if self.config.lexical_weight:
            asked = self.llm.tokenizer(questions)["input_ids"]
            scores = combined(scores, bm25(asked, tokens, self.codec.pad), self.config.lexical_weight)
        if self.config.embedding_weight:  # beside the key and BM25, each standardised over the bank
            dense = self.retrieval_keys.embedder(questions) @ self.kept_text_embeddings(tokens).T
            scores = standardised(scores) if not self.config.lexical_weight else scores
            scores = scores + self.config.embedding_weight * standardised(dense.to(scores))
        return scores.topk(1, dim=1).indices

    def kept_text_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, dim] the sentence embedding of each stored document's kept tokens [N, K] decoded as
        text; each computed once per distinct entry, since every question batch scores the same bank."""
        cache = self.__dict__.setdefault("_kept_text_embeddings", {})
        rows = [tuple(row) for row in tokens.tolist()]
        new = [row for row in dict.fromkeys(rows) if row not in cache]
        if new:
            texts = [self.llm.tokenizer.decode([t for t in row if t != self.codec.pad]) for row in new]
            cache.update(zip(new, self.retrieval_keys.embedder(texts)))
        return torch.stack([cache[row] for row in rows])

    # ---- which tokens a document keeps ---------------------------------------------------------
    @torch.no_grad()
    def token_features(self, texts: list[str], batch_size: int = 16, progress: bool = False):
        """Per text: its token ids, their character spans, and features [tokens, 2 x hidden] (each
        token's hidden state entering ``layer`` beside its successor's). Texts of similar length run
        together, padded on the right (which causal attention keeps from every real token)."""
        encoded = [
            self.llm.tokenizer(
                t, return_offsets_mapping=True, truncation=True, max_length=self.config.max_document_tokens
            )
            for t in texts
        ]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]["input_ids"]))
        out: list = [None] * len(texts)
        llm = self.llm
        with lora_disabled(llm.model):
            for first in tqdm(range(0, len(order), batch_size), desc="LLM hidden states", disable=not progress):
                members = order[first : first + batch_size]
                ids = [encoded[i]["input_ids"] for i in members]
                mask = pad([[1] * len(t) for t in ids], 0, side="right").to(llm.device)
                tokens = pad(ids, 0, side="right").to(llm.device)
                hidden = lower_hidden(llm.model, llm.layout, tokens, mask, self.config.layer).float()
                for row, i in enumerate(members):
                    states = hidden[row, : len(ids[row])]
                    following = torch.cat([states[1:], states.new_zeros(1, states.shape[1])])
                    out[i] = (ids[row], encoded[i]["offset_mapping"], torch.cat([states, following], dim=1))
        return out

    @torch.no_grad()
    def kept_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's codes: its ``keep`` best-scored token ids in document order (all of a shorter
        text's), or with written codes what the writer makes of them."""
        return [self.codes_of(ids, features) for ids, _, features in self.token_features(texts)]

    @torch.no_grad()
    def keep_positions(self, ids: list[int], features: torch.Tensor) -> list[int]:
        """Of one text's token ids and their ``token_features``, where the ``keep`` best-scored are, in order."""
        if self.config.entry_bytes is not None:
            ranked = self.scorer(features.to(self.scorer.weight.dtype)).squeeze(1).argsort(descending=True).tolist()
            chosen = self.prefix_code.coder().most_that_fit([ids[i] for i in ranked], self.config.entry_bytes)
            return sorted(ranked[j] for j in chosen)
        if len(ids) <= self.config.keep:
            return list(range(len(ids)))
        best = self.scorer(features.to(self.scorer.weight.dtype)).squeeze(1).topk(self.config.keep).indices
        return best.sort().values.tolist()

    def keep_best(self, ids: list[int], features: torch.Tensor) -> list[int]:
        """Of one text's token ids and their ``token_features``, the ``keep`` best-scored, in order."""
        return [ids[i] for i in self.keep_positions(ids, features)]

    @torch.no_grad()
    def codes_of(self, ids: list[int], features: torch.Tensor) -> list[int]:
        """One text's bank codes from its token ids and ``token_features``."""
        positions = self.keep_positions(ids, features)
        kept = [ids[i] for i in positions]
        if self.writer is None:
            return kept
        return self.codebook.lookup(self.write(torch.tensor(kept), features[positions])).tolist()

    def write(self, kept: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Kept token ids [..., K] and their features [..., K, 2 x hidden] -> the vectors to quantize."""
        own = self.codebook.embeddings(kept.to(self.llm.device))
        return self.writer(own, features.to(self.llm.device))

    def compress(self, documents: list[str]) -> np.ndarray:
        """Documents -> bank entries [N, keep, 1] (what ``memory/ingest.py`` stores)."""
        return self.codec.encode(self.kept_ids(check_texts(documents, "documents")))

    def texts(self, entries: np.ndarray) -> list[str]:
        """Bank entries -> the kept tokens of each document, as text."""
        return [self.llm.tokenizer.decode(ids) for ids in self.codec.decode(entries)]

    # ---- answering (through a RetrievalReader over a bank: memory/readers.py) -----------------
    @torch.no_grad()
    def answer_read(self, reader, questions: list[str], decoding: DecodingConfig | None = None):
        """Each question answered by the base LLM reading its top-1 document's kept tokens; and the
        bank ids it read."""
        read = reader.top_ids(questions)
        contexts = [tuple(c) for c in self.codec.decode(reader.bank.entries([ids[0] for ids in read]))]
        by_context: dict[tuple, list[int]] = {}
        for i, context in enumerate(contexts):
            by_context.setdefault(context, []).append(i)
        # One document's prompts run together, so that their common start runs once; documents read
        # by one question each run together in one batch.
        batches = [members for members in by_context.values() if len(members) > 1]
        batches.append([members[0] for members in by_context.values() if len(members) == 1])
        answers: list = [None] * len(questions)
        for members in filter(None, batches):
            ids = [self.prompt_ids(list(contexts[i]), questions[i]) for i in members]
            for i, answer in zip(members, self.continue_prompts(ids, decoding)):
                answers[i] = answer
        return answers, read

    def prompt(self, context: str, question: str) -> str:
        """What the LLM reads: the kept tokens as context, worked examples (which teach the
        untrained LLM the short-answer format; a reader starts training from there), the question."""
        return prompts.context_prompt(context, question)

    def prompt_ids(self, codes: list[int], question: str) -> list[int]:
        """``prompt`` as token ids. Kept tokens go in as text (decoded and tokenized again, as they
        were measured); written codes go in as the ids themselves, as training read them."""
        if self.writer is None:
            return self.llm.tokenizer(self.prompt(self.llm.tokenizer.decode(codes), question))["input_ids"]
        before, after = self.prompt_around(question)
        return before + codes + after

    def prompt_around(self, question: str) -> tuple[list[int], list[int]]:
        """The prompt's ids before and after the context."""
        return prompts.ids_around_context(self.llm.tokenizer, question)

    def continue_prompts(self, ids: list[list[int]], decoding: DecodingConfig | None = None) -> list[str]:
        """The LLM's answer to each prompt: with the trained reader's KV-LoRA, or the base LLM alone."""
        if self.config.trained_reader:
            return self.llm.generate(ids, None, decoding)
        with lora_disabled(self.llm.model):
            return self.llm.generate(ids, None, decoding)

    # ---- the bank it writes, and saving ------------------------------------------------------
    def bank_layout(self) -> BankLayout:
        keys = self.retrieval_keys.quantizer
        return BankLayout(
            self.codec.mode,
            self.codec.keep,
            1,
            self.codec.codebook_size,
            self.llm.layout.hidden_size,
            self.bank_fingerprint(),
            keys.subspaces,
            keys.codes,
        )

    def bytes_per_document(self) -> dict[str, float]:
        tokens = packed_size(self.codec.keep, self.codec.codebook_size)  # 2 bytes a token for SmolLM2, or entry_bytes
        return {"tokens": tokens, "retrieval_key": self.retrieval_keys.bytes_per_document()}

    def bank_fingerprint(self) -> str:
        """What a stored entry's meaning depends on: the scorer that chose the tokens (the tokenizer
        is fixed by the base LLM the config names) and the retrieval keys' centroids."""
        writer = [] if self.writer is None else list(self.writer.state_dict().values())
        code = [self.prefix_code.lengths.float()] if self.prefix_code is not None else []
        return fingerprint([self.scorer.weight, self.scorer.bias, *writer, *code, self.retrieval_keys.centroids])

    codebook_fingerprint = bank_fingerprint  # what checkpoint.py records and checks

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        keys = {f"retrieval_keys.{k}": v for k, v in self.retrieval_keys.state().items()}
        reader = {}
        if self.config.trained_reader:  # the base LLM's KV-LoRA, trained to read kept tokens
            reader = {f"llm.{k}": v.detach().cpu().clone() for k, v in self.llm.state_dict().items() if ".lora_" in k}
        writer = {} if self.writer is None else {f"writer.{k}": v for k, v in self.writer.state_dict().items()}
        code = {"prefix_code.lengths": self.prefix_code.lengths.clone()} if self.prefix_code is not None else {}
        scorer = {f"scorer.{k}": v for k, v in self.scorer.state_dict().items()}
        return {**scorer, **writer, **code, **keys, **reader}

    def save_pretrained(self, folder: str | Path) -> None:
        checkpoint.save(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "TokenMemory":
        values = checkpoint.read_config_dict(folder)
        if values.get("kind") != KIND:
            raise MBCError(
                f"{folder} is not a token memory (an MBC or MAC adapter, or another checkpoint): "
                "give a folder that `mbc train-tokens` wrote"
            )
        model = cls.build(TokenMemoryConfig.from_dict(values))
        checkpoint.load_state(model, folder)
        return model.eval()


def is_token_memory(folder: str | Path) -> bool:
    """Whether a checkpoint folder holds a token memory (rather than an MBC or MAC adapter)."""
    return checkpoint.read_config_dict(folder).get("kind") == KIND

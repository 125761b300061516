"""The frozen base LLM that every memory of this package reads with: ``FrozenLLM``.

It owns the LLM and its tokenizer, the prompt and answer token ids, KV-LoRA on the last
``lora_layers`` layers and a prefix entry on the last ``prefix_layers`` (the only parts of it that a
memory adapts), the QA loss on answer tokens, and generation. MBC, MAC and the token memory each
compose one; none of them subclasses it.

It runs in two parts, split at the first layer that carries a prefix or KV-LoRA. Below that layer
nothing trains and nothing of the memory enters, so the hidden state a training row (prompt +
answer) brings to it depends on the tokens alone: training may compute it once and keep it
(training/activations.py). ``lower_hidden`` runs the embeddings and the layers below;
``upper_hidden`` the rest and the final norm. Together they compute what ``llm.base_model`` does,
with the same mask and positions (tests/test_frozen_llm.py checks loss and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask

from mbc.errors import MBCError
from mbc.network.decoding import DecodingConfig, FirstLine, generate, shared_length
from mbc.network.llm_layout import LLMLayout, describe_llm
from mbc.network.lora import add_kv_lora
from mbc.network.prefix import enable_prefix_attention, prefix_in

IGNORE = -100  # label of tokens that carry no loss (the prompt, padding)
SHARED_START_TOKENS = 16  # prompts sharing at least this many first tokens run them once (decoding.greedy)


def pad(sequences: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in sequences)
    filler = [[value] * (width - len(s)) for s in sequences]
    rows = [f + s if side == "left" else s + f for s, f in zip(sequences, filler)]
    return torch.tensor(rows, dtype=torch.long)


def first_adapted_layer(layout: LLMLayout, prefix_layers: int, lora_layers: int) -> int:
    """Index of the lowest layer with a prefix or KV-LoRA (0: every layer has one, nothing is frozen below)."""
    return layout.num_layers - max(prefix_layers, lora_layers)


def _base(llm: nn.Module) -> nn.Module:
    return llm.base_model


def _layers(llm: nn.Module, layout: LLMLayout) -> nn.ModuleList:
    return _base(llm).h if layout.family == "gpt2" else _base(llm).layers


def _run(llm: nn.Module, layout: LLMLayout, hidden: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
    base = _base(llm)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    causal = create_causal_mask(
        config=base.config, inputs_embeds=hidden, attention_mask=mask, cache=None, position_ids=positions
    )
    if layout.family == "gpt2":
        for block in layers:
            hidden = block(hidden, None, causal, position_ids=positions)
        return hidden
    rotary = base.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=causal, position_embeddings=rotary, position_ids=positions)
    return hidden


def lower_hidden(llm: nn.Module, layout: LLMLayout, ids: torch.Tensor, mask: torch.Tensor, stop: int) -> torch.Tensor:
    """Token ids [B, T] -> the hidden state [B, T, d] entering layer ``stop``."""
    base = _base(llm)
    if layout.family == "gpt2":
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        hidden = base.drop(base.wte(ids) + base.wpe(positions))
    else:
        hidden = base.embed_tokens(ids)
    return _run(llm, layout, hidden, mask, _layers(llm, layout)[:stop])


def upper_hidden(
    llm: nn.Module, layout: LLMLayout, hidden: torch.Tensor, mask: torch.Tensor, start: int
) -> torch.Tensor:
    """The hidden state entering layer ``start`` [B, T, d] -> the last hidden state (final norm applied)."""
    hidden = _run(llm, layout, hidden, mask, _layers(llm, layout)[start:])
    return _base(llm).ln_f(hidden) if layout.family == "gpt2" else _base(llm).norm(hidden)


class FrozenLLM(nn.Module):
    """A loaded causal LM (``backbone``: backbones.load_llm), frozen, with KV-LoRA on its last
    ``lora_layers`` layers and a prefix entry on its last ``prefix_layers`` (0: all); questions are
    asked in ``prompt_template``."""

    def __init__(
        self,
        backbone,
        prompt_template: str,
        prefix_layers: int,
        lora_layers: int,
        lora_rank: int,
        lora_alpha: float,
        lora_dropout: float,
    ):
        super().__init__()
        self.name, self.model, self.tokenizer = backbone.name, backbone.model, backbone.tokenizer
        self.prompt_template = prompt_template
        self.layout = describe_llm(self.model)
        self.prefix_layers = prefix_layers or self.layout.num_layers
        for what, layers in (("prefix_layers", self.prefix_layers), ("lora_layers", lora_layers)):
            if layers > self.layout.num_layers:
                raise MBCError(f"{what}={layers} but the base LLM has only {self.layout.num_layers} layers")
        if self.tokenizer.eos_token_id is None:
            raise MBCError(f"the tokenizer of '{self.name}' has no EOS token, which answers must end with")
        self.first_adapted_layer = first_adapted_layer(self.layout, self.prefix_layers, lora_layers)
        self._first_line = None  # built on the first generate: a table over the vocabulary (decoding.FirstLine)
        self.model.requires_grad_(False)
        self.model.eval()  # frozen: no dropout inside the base model
        add_kv_lora(self.layout, lora_layers, lora_rank, lora_alpha, lora_dropout)
        enable_prefix_attention(self.model)

    @classmethod
    def from_config(cls, config, backbone=None) -> "FrozenLLM":
        """The LLM an ``MBCConfig`` names (or ``backbone``, already loaded), adapted as it says."""
        from mbc.network import backbones

        return cls(
            backbone or backbones.load_llm(config.llm, config.llm_quantization),
            config.prompt_template,
            config.prefix_layers,
            config.lora_layers,
            config.lora_rank,
            config.lora_alpha,
            config.lora_dropout,
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        for module in self.model.modules():  # only the adapters' dropout follows the mode
            if hasattr(module, "lora_A"):
                module.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if ".lora_" in name]

    # ---- text -> token ids -------------------------------------------------------------------
    def prompt_ids(self, question: str, template: str | None = None) -> list[int]:
        return self.tokenizer((template or self.prompt_template).format(question=question))["input_ids"]

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

    # ---- the QA loss -------------------------------------------------------------------------
    def qa_loss(self, questions: list[str], answers: list[str], prefix) -> torch.Tensor:
        """Mean negative log-likelihood of the answer tokens (+ EOS), as ``llm(labels=...).loss``
        computes it, but projecting onto the vocabulary only where an answer token is predicted:
        with short answers the projection of every prompt token was a fifth of a CPU step."""
        ids, mask, labels = self.training_inputs(questions, answers)
        with prefix_in(self.layout, prefix):
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.answer_loss(hidden, labels)

    def loss_around(
        self, inserted: list[torch.Tensor], before: list[list[int]], after: list[list[int]], answers: list[list[int]]
    ) -> torch.Tensor:
        """The QA loss of rows read as ``before`` ids, then vectors ``inserted[i]`` [k_i, dim] in
        the input embedding's place (codes with gradients passed straight through to them), then
        ``after`` ids (the question), then ``answers`` ids (the answer + EOS, what the loss scores).
        The whole LLM runs on every step: nothing of a row below the adapters is fixed."""
        rows, labels = [], []
        embed = self.model.get_input_embeddings()
        for vectors, head, tail, answer in zip(inserted, before, after, answers):
            around = embed(torch.tensor(head + tail + answer, device=self.device))
            rows.append(torch.cat([around[: len(head)], vectors.to(around.dtype), around[len(head) :]]))
            labels.append([IGNORE] * (len(head) + len(vectors) + len(tail)) + answer)
        width = max(len(r) for r in rows)
        inputs = torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        targets = pad(labels, IGNORE).to(self.device)
        hidden = self.model.base_model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        return self.answer_loss(hidden, targets)

    def prompts_loss(self, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
        """The QA loss of ``answers`` ids after ``prompts`` ids (any prompt, not only the template's)."""
        nothing = torch.zeros(0, self.layout.hidden_size, device=self.device)
        return self.loss_around([nothing] * len(prompts), prompts, [[] for _ in prompts], answers)

    @torch.no_grad()
    def lower_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training rows' ids [B, T] -> the hidden state entering the first layer with a prefix or
        KV-LoRA, which depends on the tokens alone."""
        return lower_hidden(self.model, self.layout, ids, mask, self.first_adapted_layer)

    def qa_loss_from_lower(self, lower: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, prefix) -> torch.Tensor:
        """``qa_loss`` from ``lower_hidden`` of its rows, kept from an earlier step: only the layers
        that carry a prefix or KV-LoRA run."""
        with prefix_in(self.layout, prefix):
            hidden = upper_hidden(self.model, self.layout, lower, mask, self.first_adapted_layer)
        return self.answer_loss(hidden, labels)

    def answer_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the last hidden states [B, T, d] on the tokens ``labels`` [B, T] predicts."""
        targets = labels[:, 1:]
        predicted = targets != IGNORE
        logits = self.model.get_output_embeddings()(hidden[:, :-1][predicted]).float()
        return F.cross_entropy(logits, targets[predicted])

    # ---- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def answer(
        self, questions: list[str], prefix=None, decoding: DecodingConfig | None = None, template: str | None = None
    ) -> list[str]:
        """Each question asked in the prompt template (or ``template``), after a prefix (or None)."""
        return self.generate([self.prompt_ids(q, template) for q in questions], prefix, decoding)

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
            self._first_line = FirstLine(self.tokenizer, self.model.get_output_embeddings().weight.shape[0])
        eos = self.tokenizer.eos_token_id
        ids, mask = ids.to(self.device), mask.to(self.device)
        tokens = generate(self.model, self.layout, ids, mask, prefix, eos, decoding, self._first_line, shared)
        # Answers are one line: a model that runs on (a few-shot prompt's next "Question:") is cut there.
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip().split("\n")[0].strip() for t in tokens]

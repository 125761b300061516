"""CaMeLS: Context-aware Meta-learned Loss Scaling (Hu et al., "Meta-Learning Online Adaptation of
Language Models", EMNLP 2023), the strongest online fine-tuning baseline of MAC's and MBC's papers.

A small model reads a document and gives each of its tokens a weight; online fine-tuning then
steps the LLM on the document's language-model loss with each token's term scaled by its weight
(finetuning.py, ``spans="camels"``). The weights are meta-trained: for a training document and a
question about it,

    inner:  theta' = theta - inner_lr * grad_theta  mean_i w_i * CE_i(document; theta)
    outer:  QA loss of the LLM at theta'  +  locality_weight * KL(LLM at theta || at theta') on another document

and the outer loss is back-propagated through the inner step into the weighting model, so that it
learns which tokens, once learned, answer later questions.

As the reference does: one SGD inner step, a softplus (beta 3) weight per token, the KL locality
term on text unrelated to the document (here another training document), the QA-tuned LLM as the
model being updated. Where this differs, for two CPU cores:

- the inner update moves only the LLM's last ``inner_layers`` decoder layers (the reference moves
  all of DistilGPT2 to GPT-2 XL); the outer gradient needs the inner gradient's graph, and keeping
  it for 30 layers of SmolLM2 is what does not fit the time;
- the weighting model reads the frozen hidden states of the QA-tuned LLM's first ``feature_layers``
  layers and trains a small transformer over them (the reference fine-tunes all of DistilGPT2);
- its last layer starts at weight 1 for every token, i.e. at Uniform fine-tuning, rather than at
  the reference's zero layer (softplus(0) / 3 = 0.23 everywhere).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from mbc.errors import MBCError
from mbc.finetuning import QA_TUNING_FILE, ClosedBookLLM, check_qa_tuned
from mbc.network.frozen_llm import pad
from mbc.settings import Field, from_dict, settings

CONFIG_FILE = "camels.json"
WEIGHTS_FILE = "weighting_model.safetensors"
SOFTPLUS_BETA = 3.0  # the reference's non-linearity: softplus with beta 3


@settings
class CaMeLSConfig:
    feature_layers: Annotated[int, Field(ge=1)] = 4  # frozen layers of the QA-tuned LLM the weigher reads
    width: Annotated[int, Field(ge=8)] = 128  # the reference's hidden width (its fc1)
    layers: Annotated[int, Field(ge=0)] = 2  # trained transformer layers over the frozen features
    heads: Annotated[int, Field(ge=1)] = 4
    inner_layers: Annotated[int, Field(ge=1)] = 2  # LLM layers the inner step moves (see the module's doc)
    inner_learning_rate: Annotated[float, Field(gt=0)] = 0.1  # the inner SGD step (on 2 layers: see docs/METHOD.md)
    locality_weight: Annotated[float, Field(ge=0)] = 0.1  # the reference's c_kl
    max_document_tokens: Annotated[int, Field(ge=16)] = 512


@settings
class MetaTraining:
    steps: Annotated[int, Field(ge=1)] = 300
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3  # Adam on the weighting model
    questions_per_document: Annotated[int, Field(ge=1)] = 4  # the outer QA batch
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0


def qa_tuned_fingerprint(folder: str | Path) -> str:
    """Which QA-tuned LLM a weighting model was trained on: the weights it reads must be the same."""
    return hashlib.sha256((Path(folder) / QA_TUNING_FILE).read_bytes()).hexdigest()[:16]


def check_weighting_model(folder: str | Path, qa_tuned: str | Path) -> dict:
    """What `mbc train-camels` saved in ``folder``, once it is known to be a weighting model trained
    for the QA-tuned LLM in ``qa_tuned``; one line saying what is wrong otherwise."""
    config_file = Path(folder) / CONFIG_FILE
    if not config_file.is_file():
        raise MBCError(f"{folder} is not a CaMeLS weighting model (no {CONFIG_FILE}): make one with `mbc train-camels`")
    saved = json.loads(config_file.read_text())
    if saved.get("qa_tuned_fingerprint") != qa_tuned_fingerprint(check_qa_tuned(qa_tuned)):
        raise MBCError(
            f"{folder} was trained on the QA-tuned LLM {saved.get('qa_tuned')}, not on {qa_tuned}: "
            "give that one with --qa-tuned, or train a weighting model on this one"
        )
    return saved


def lower_layers(llm: nn.Module, count: int) -> nn.Module:
    """A frozen copy of ``llm``'s token embeddings and first ``count`` layers, returning their hidden
    states: the weighting model's features, unchanged while fine-tuning moves the LLM itself."""
    copied = copy.deepcopy(llm.base_model)
    stack = copied.h if hasattr(copied, "h") else copied.layers
    if count > len(stack):
        raise MBCError(f"feature_layers is {count} but the LLM has only {len(stack)} layers")
    stack = nn.ModuleList(list(stack)[:count])
    if hasattr(copied, "h"):
        copied.h = stack
    else:
        copied.layers = stack
    return copied.requires_grad_(False).eval()


class WeightingModel(nn.Module):
    """One weight per token of a document: frozen lower-layer features of the QA-tuned LLM, a small
    trained transformer, a two-layer head and a softplus."""

    def __init__(self, config: CaMeLSConfig, features: nn.Module, hidden_size: int, pad_id: int):
        super().__init__()
        self.config, self.pad_id = config, pad_id
        self.features = [features]  # a list: its frozen weights are not this module's parameters
        self.project = nn.Linear(hidden_size, config.width)
        layer = nn.TransformerEncoderLayer(config.width, config.heads, 4 * config.width, dropout=0.0, batch_first=True)
        self.context = (
            nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False) if config.layers else None
        )
        self.head = nn.Sequential(nn.Linear(config.width, config.width), nn.GELU(), nn.Linear(config.width, 1))
        with torch.no_grad():  # start at Uniform: softplus_beta(b) = 1 everywhere
            self.head[-1].weight.zero_()
            self.head[-1].bias.fill_(math.log(math.expm1(SOFTPLUS_BETA)) / SOFTPLUS_BETA)

    @classmethod
    def for_llm(cls, config: CaMeLSConfig, model: ClosedBookLLM) -> "WeightingModel":
        features = lower_layers(model.llm, config.feature_layers)
        return cls(config, features, model.layout.hidden_size, model.tokenizer.pad_token_id)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.features[0](input_ids=ids, attention_mask=mask).last_hidden_state
        x = self.project(hidden)
        if self.context is not None:
            x = self.context(x, src_key_padding_mask=mask == 0)
        return F.softplus(self.head(x).squeeze(-1), beta=SOFTPLUS_BETA) * mask

    def weights(self, windows: list[list[int]]) -> torch.Tensor:
        """The weights of each token of the padded ``windows`` (token ids), shape (rows, tokens)."""
        ids = pad(windows, self.pad_id)
        return self(ids, pad([[1] * len(w) for w in windows], 0))

    def save(self, folder: str | Path, notes: dict) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps({"config": self.config.__dict__, **notes}, indent=2))

    @classmethod
    def load(cls, folder: str | Path, model: ClosedBookLLM, qa_tuned: str | Path) -> "WeightingModel":
        """A weighting model `mbc train-camels` wrote, for the QA-tuned LLM it was trained on."""
        saved = check_weighting_model(folder, qa_tuned)
        weigher = cls.for_llm(from_dict(CaMeLSConfig, saved["config"], "CaMeLS config"), model)
        weigher.load_state_dict(load_file(Path(folder) / WEIGHTS_FILE))
        return weigher.eval()


# ---- meta-training -----------------------------------------------------------------------------------
def _inner_parameters(model: ClosedBookLLM, count: int) -> dict[str, torch.Tensor]:
    """The parameters of the LLM's last ``count`` layers, by name: what the inner step moves."""
    stack = model.llm.base_model.h if model.layout.family == "gpt2" else model.llm.base_model.layers
    if count > len(stack):
        raise MBCError(f"inner_layers is {count} but the LLM has only {len(stack)} layers")
    moved = {id(p) for layer in list(stack)[-count:] for p in layer.parameters()}
    return {name: p for name, p in model.llm.named_parameters() if id(p) in moved}


def _locality(model: ClosedBookLLM, updated: dict, rows) -> torch.Tensor:
    """KL of the next-token distributions on unrelated text, before and after the inner step."""
    with torch.no_grad():
        before, mask = model.logits(rows)
    after, _ = model.logits(rows, updated)
    kl = F.kl_div(after.log_softmax(-1), before.log_softmax(-1), log_target=True, reduction="none")
    return (kl.sum(-1) * mask).sum() / mask.sum()


def meta_step(weigher: WeightingModel, model: ClosedBookLLM, document: str, qa_rows, unrelated: str) -> dict:
    """One outer step's loss for ``document`` and its ``qa_rows`` (ids, labels); back-propagates it
    into ``weigher`` (the caller steps the optimizer). Returns its parts and the QA gain."""
    config = weigher.config
    parameters = _inner_parameters(model, config.inner_layers)
    windows, _ = model.document_rows(document, config.max_document_tokens)
    weights = weigher.weights([ids for ids, _ in windows])
    # The outer gradient differentiates the inner gradient: the fused CPU attention kernels have no
    # second derivative, the math kernel has.
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        for p in parameters.values():
            p.requires_grad_(True)
        inner = model.loss(windows, weights, parameters)
        grads = torch.autograd.grad(inner, list(parameters.values()), create_graph=True)
        updated = {n: p - config.inner_learning_rate * g for (n, p), g in zip(parameters.items(), grads)}
        qa = model.loss(qa_rows, parameters=updated)
        locality = qa.new_zeros(())
        if config.locality_weight > 0 and unrelated:
            other, _ = model.document_rows(unrelated, config.max_document_tokens)
            locality = _locality(model, updated, other[:1])
        (qa + config.locality_weight * locality).backward(inputs=list(weigher.parameters()))
    with torch.no_grad():
        qa_before = model.loss(qa_rows).item()
    return {
        "qa_loss": qa.item(),
        "qa_gain": qa_before - qa.item(),
        "locality_kl": locality.item(),
        "mean_weight": (weights.sum() / (weights > 0).sum()).item(),
    }


def meta_train(
    model: ClosedBookLLM, config: CaMeLSConfig, training: MetaTraining, examples, log=None
) -> tuple[WeightingModel, list[dict]]:
    """Meta-train a weighting model for ``model`` (the QA-tuned LLM) on ``examples`` (QAExample
    rows of the training split): each step one document, up to ``questions_per_document`` of its
    questions as the outer batch, another document for the locality term. The LLM is unchanged."""
    by_document: dict[str, list] = {}
    for row in examples:
        by_document.setdefault(row.document, []).append(row)
    if len(by_document) < 2:
        raise MBCError("CaMeLS meta-training needs question-answer pairs on at least 2 documents in the training split")
    torch.manual_seed(training.seed)
    order = random.Random(training.seed)
    weigher = WeightingModel.for_llm(config, model)
    optimizer = torch.optim.Adam(weigher.parameters(), lr=training.learning_rate)
    model.llm.requires_grad_(False).eval()
    documents, history = list(by_document), []
    for step in tqdm(range(training.steps), desc="CaMeLS meta-training", unit="step"):
        document = documents[step % len(documents)]
        unrelated = documents[(step + 1 + order.randrange(len(documents) - 1)) % len(documents)]
        questions = order.sample(
            by_document[document], min(training.questions_per_document, len(by_document[document]))
        )
        qa_rows = [model.training_row(r.question, r.answers[0]) for r in questions]
        start = time.perf_counter()
        optimizer.zero_grad()
        metrics = meta_step(weigher, model, document, qa_rows, unrelated)
        optimizer.step()
        history.append({"step": step + 1, **metrics, "seconds": time.perf_counter() - start})
        if log is not None:
            log(history[-1])
    model.llm.requires_grad_(True)
    return weigher.eval(), history


def token_weights_text(weigher: WeightingModel, model: ClosedBookLLM, document: str, top: int = 12) -> str:
    """The document's most and least weighted tokens, for a reader to see what CaMeLS learned."""
    windows, _ = model.document_rows(document, weigher.config.max_document_tokens)
    with torch.no_grad():
        weights = weigher.weights([ids for ids, _ in windows])
    pairs = [
        (w, model.tokenizer.decode([t])) for (ids, _), row in zip(windows, weights) for t, w in zip(ids, row.tolist())
    ]
    ranked = sorted(pairs, key=lambda p: -p[0])
    show = lambda ps: ", ".join(f"{t.strip() or repr(t)} {w:.2f}" for w, t in ps)  # noqa: E731
    return f"highest: {show(ranked[:top])}\nlowest:  {show(ranked[-top:])}"

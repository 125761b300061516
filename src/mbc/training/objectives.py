"""Training objectives: the paper's loss and the schedule's variants of it, around one MBCModel.

``StepObjective`` wraps the model (it is what the accelerator prepares, so that multi-process
training synchronises its gradients) and computes one step's loss as the ``Step`` of the schedule
says. With the default ``Step`` it is the model's own loss, QA + lambda * VQ.

The answer probe (``answer_probe_loss``; not in the paper): the modulation read through the LLM's
frozen output embedding after a LayerNorm, a logit lens, scored against the answer's first token
(or its first K tokens, one per modulation vector). Why: the QA loss reaches the document side
only through a prefix that starts at zero and a frozen LLM, and in CPU budgets the adapter learned
answer priors long before it learned to look in its memory; the LLM side learns to read a memory
that already carries the answer in about 100 steps (bench/reading_parts.py, docs/JOURNAL.md).

Teaching the LLM side to read (``with_answer_hint``; not in the paper): in the last probe steps the
prefix and KV-LoRA also learn the QA loss from the modulation plus the probe's target direction, so
that at the switch to the QA loss they already read the direction in which the memory holds answers.

Naming (``naming_loss``, naming.py; vocabulary codes only): each document slot also scored against
one of the document's answer tokens. A model that reads its codes input-side (``code_reading="input"``)
has no modulation: its QA loss reads each question's own document's codes as tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from mbc.errors import MBCError
from mbc.model import MBCModel
from mbc.network.frozen_llm import IGNORE, pad
from mbc.training.activations import FrozenActivations
from mbc.training.naming import naming_loss, placed_tokens, placement_loss
from mbc.training.schedule import OBJECTIVES, PROBE_TOKENS, Step

READING_PATH = ("amortization.", "pointer.", "question_network.", "quantizer.", "aggregator.")  # what the probe trains
NAMING_PATH = ("amortization.", "pointer.", "quantizer.")  # what naming alone trains


@dataclass
class StepOutput:
    loss: torch.Tensor  # what is minimised: qa (or probe) + probe_weight x probe + vq_weight x vq
    qa_loss: torch.Tensor  # 0 under the probe objective
    vq_loss: torch.Tensor
    perplexity: torch.Tensor  # codebook perplexity of this batch (0 for MAC)
    probe_loss: torch.Tensor  # 0 unless the step uses the probe
    reading_gap: torch.Tensor  # measure_gap: the loss reading another batch document minus its own
    naming_loss: torch.Tensor  # naming steps: slot k against the document's k-th answer token (naming.py)


class StepObjective(nn.Module):
    def __init__(
        self,
        model: MBCModel,
        frozen: FrozenActivations | None = None,
        naming_targets: dict[str, list[int]] | None = None,
        naming_places: dict[str, list[int]] | None = None,
    ):
        """``frozen``: what the frozen layers make of each row and text, kept (activations.py);
        ``naming_targets``: each training document's answer tokens, for the naming steps (naming.py);
        ``naming_places``: their positions, which train the pointer's placement (network/pointer.py)."""
        super().__init__()
        self.model = model
        self.frozen = frozen if frozen is not None and frozen.enabled else None
        self.naming_targets = naming_targets or {}
        self.naming_places = naming_places or {}

    def forward(
        self, documents: list[str], questions: list[str], answers: list[str], own: list[int], step: Step = Step()
    ) -> StepOutput:
        """One step's loss on a batch: ``documents`` form the bank, ``own[i]`` is the index of
        question i's own document."""
        if step.objective not in OBJECTIVES:
            raise MBCError(f"objective must be one of {OBJECTIVES}, got {step.objective!r}")
        model = self.model
        frozen = self.frozen
        # made once a step: the pointer reads them and, with placement, the naming loss too
        states = (frozen or model).pointer_states(documents) if model.pointer is not None else None
        amortize = frozen.amortize if frozen else model.amortize
        contexts = amortize_some_with_grad(amortize, documents, step.backprop_keep, states)
        naming = contexts.new_zeros(())
        if step.naming_weight > 0:
            targets = [self.naming_targets.get(document, []) for document in documents]
            if model.pointer is not None and model.pointer.salience is not None:
                # placed slots name what lies where they are placed: the ordered targets would shift
                # every later slot's target at each token the salience adds or drops (JOURNAL, session 33)
                places = [self.naming_places.get(document, []) for document in documents]
                naming = placement_loss(model.pointer, states.hidden, states.mask, places)
                # and each slot names the token it is placed on: without it the QA loss's
                # straight-through gradient moved the slots off them ("1963" stored as "1 9 7")
                placed = placed_tokens(model.pointer, states, model.config.num_slots)
                naming = naming + naming_loss(model.quantizer.stages[0], contexts, placed, step.naming_temperature)
            else:
                naming = naming_loss(model.quantizer.stages[0], contexts, targets, step.naming_temperature)
        memory = model.codec.training_memory(contexts)
        if step.objective == "name":
            zero = naming.new_zeros(())
            loss = (
                step.naming_weight * naming
                + model.config.vq_weight * memory.vq_loss
                + _rest_in_graph(model, NAMING_PATH)
            )
            return StepOutput(loss, zero, memory.vq_loss, memory.perplexity, zero, zero, naming)
        if model.reads_input:  # the codes as tokens before the question: no modulation, probe or float memory
            read, held = memory, 0.0
            if step.hold_reading:  # only the reader (KV-LoRA) learns: the LLM's lower layers build no graph
                read, held = replace(memory, vectors=memory.vectors.detach()), 0.0 * memory.vectors.sum()
            qa_loss = model.input_reading_loss(questions, answers, read, own, model.filled_slots(states), documents)
            zero = qa_loss.new_zeros(())
            loss = qa_loss + model.config.vq_weight * memory.vq_loss + step.naming_weight * naming + held
            return StepOutput(loss, qa_loss, memory.vq_loss, memory.perplexity, zero, zero, naming)
        vectors, vq_loss = memory.vectors, memory.vq_loss
        if step.float_memory:  # the codebook stays in the graph (every process must use every parameter)
            vectors, vq_loss = contexts, 0.0 * memory.vq_loss
        visible = None
        if model.retrieval_keys is None and step.bank_size is not None and step.bank_size < len(documents):
            visible = bank_mask(own, len(documents), step.bank_size, model.config.num_slots).to(model.device)
        queries = frozen.queries(questions) if frozen else model.queries(questions)
        modulation = model.training_modulation(questions, documents, vectors, own, visible, queries)
        vq_term = model.config.vq_weight * vq_loss

        def reading_gap(loss_of, loss: torch.Tensor) -> torch.Tensor:
            """``loss_of`` the modulation with each question reading the next batch document instead
            of its own, minus ``loss``: what the memory is worth to this step's objective."""
            if not step.measure_gap or not self._can_swap(documents):
                return loss.new_zeros(())
            other = [(document + 1) % len(documents) for document in own]
            # The measurement runs the LoRA dropout too: on a forked generator, so that training
            # draws the same masks whether or how often the gap is measured.
            with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(model)):
                return loss_of(model.training_modulation(questions, documents, vectors, other, None, queries)) - loss

        if step.objective == "probe":
            probe_loss = answer_probe_loss(model, modulation, answers, step.probe_tokens)
            gap = reading_gap(
                lambda read: answer_probe_loss(model, read, answers, step.probe_tokens), probe_loss.detach()
            )
            taught = probe_loss.new_zeros(())
            # Teaching: the LLM side learns to read the answer's direction; the reading path gets no QA gradient.
            if step.teach_reading > 0:
                hinted = with_answer_hint(model, modulation.detach(), answers, step.teach_reading)
                taught = (frozen or model.llm).qa_loss(questions, answers, model.prefix(hinted))
            probe_loss = probe_loss + _rest_in_graph(model, READING_PATH)
            loss = probe_loss + taught + vq_term + step.naming_weight * naming
            return StepOutput(loss, taught, vq_loss, memory.perplexity, probe_loss, gap, naming)
        if step.hold_reading:  # the same values, no gradient, every parameter still in the graph (DDP)
            modulation, vq_term = modulation.detach() + 0.0 * modulation, 0.0 * vq_term

        scorer = frozen or model.llm
        qa_loss = scorer.qa_loss(questions, answers, model.prefix(modulation))
        gap = reading_gap(lambda read: scorer.qa_loss(questions, answers, model.prefix(read)), qa_loss.detach())
        probe_loss = (
            answer_probe_loss(model, modulation, answers, step.probe_tokens)
            if step.probe_weight > 0
            else qa_loss.new_zeros(())
        )
        loss = qa_loss + step.probe_weight * probe_loss + vq_term + step.naming_weight * naming
        return StepOutput(loss, qa_loss, vq_loss, memory.perplexity, probe_loss, gap, naming)

    def _can_swap(self, documents: list[str]) -> bool:
        """Whether a question can be made to read another document in place of its own: with
        retrieval keys reading one document each, and two documents or more in the batch."""
        config = self.model.config
        return self.model.retrieval_keys is not None and config.retrieval_top_k == 1 and len(documents) > 1


def _cuda_devices(model: MBCModel) -> list[int]:
    """The CUDA device whose generator ``fork_rng`` must also keep (none on a CPU)."""
    return [model.device.index or 0] if model.device.type == "cuda" else []


def amortize_some_with_grad(amortize, documents: list[str], keep: float, states=None) -> torch.Tensor:
    """The reference's backprop dropout: only ``keep`` of the documents are amortized (by
    ``amortize``, e.g. ``model.amortize``) with gradients, the rest under no_grad, to save memory.
    ``states``: the documents' ``pointer_states``, where already made."""
    keep_count = max(1, round(keep * len(documents)))
    if keep_count >= len(documents) or not torch.is_grad_enabled():
        return amortize(documents, states)

    def amortize_rows(rows: list[int]) -> torch.Tensor:
        return amortize([documents[i] for i in rows], None if states is None else states.rows(rows))

    order = torch.randperm(len(documents))
    with_grad = amortize_rows(order[:keep_count].tolist())
    with torch.no_grad():
        without_grad = amortize_rows(order[keep_count:].tolist())
    return torch.cat([with_grad, without_grad])[torch.argsort(order)]  # back in the documents' order


def bank_mask(own: list[int], num_documents: int, bank_size: int, num_slots: int) -> torch.Tensor:
    """[questions, documents * K]: each question sees its own document and bank_size - 1 random others."""
    visible = torch.zeros(len(own), num_documents, dtype=torch.bool)
    for row, document in enumerate(own):
        others = [d for d in torch.randperm(num_documents).tolist() if d != document][: bank_size - 1]
        visible[row, [document, *others]] = True
    return visible.repeat_interleave(num_slots, dim=1)


def answer_probe_logits(model: MBCModel, modulation: torch.Tensor, tokens: str = "first") -> torch.Tensor:
    """The modulation [B, K, dim] through a LayerNorm and the LLM's frozen output embedding.
    ``first``: its mean over the K vectors -> [B, vocab]; ``all``: each vector -> [B, K, vocab]."""
    if tokens not in PROBE_TOKENS:
        raise MBCError(f"probe tokens must be one of {PROBE_TOKENS}, got {tokens!r}")
    read = modulation.mean(1) if tokens == "first" else modulation
    return model.llm.model.get_output_embeddings()(F.layer_norm(read, read.shape[-1:]))


def answer_probe_loss(
    model: MBCModel, modulation: torch.Tensor, answers: list[str], tokens: str = "first"
) -> torch.Tensor:
    """Cross-entropy of the answer's first token (``first``) or its first K tokens (``all``, vector k
    for token k) under ``answer_probe_logits``."""
    logits = answer_probe_logits(model, modulation, tokens).float()
    if tokens == "first":
        return F.cross_entropy(
            logits, torch.tensor([model.llm.answer_ids(a)[0] for a in answers], device=logits.device)
        )
    targets = pad([model.llm.answer_ids(a)[:-1][: modulation.shape[1]] for a in answers], IGNORE).to(logits.device)
    return F.cross_entropy(logits[:, : targets.shape[1]].flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def with_answer_hint(model: MBCModel, modulation: torch.Tensor, answers: list[str], strength: float) -> torch.Tensor:
    """The modulation [B, K, dim] plus, in every slot, the direction of the answer's first token in
    the LLM's output embedding (the probe's target) at ``strength`` times the slot's norm."""
    first = torch.tensor([model.llm.answer_ids(a)[0] for a in answers], device=modulation.device)
    direction = F.normalize(model.llm.model.get_output_embeddings().weight[first].to(modulation.dtype), dim=-1)
    return modulation + strength * modulation.norm(dim=-1, keepdim=True) * direction[:, None]


def _rest_in_graph(model: MBCModel, used: tuple[str, ...]) -> torch.Tensor:
    """0 x every trainable parameter whose name does not start with one of ``used`` (for the
    probe: the prefix and KV-LoRA): multi-process training (DDP) needs every parameter in each
    step's graph."""
    return 0.0 * sum(p.sum() for name, p in model.named_parameters() if p.requires_grad and not name.startswith(used))

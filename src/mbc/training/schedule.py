"""The training schedule: for each optimizer step, which objective, which memory and which bank apply.

The paper trains on one objective throughout (QA + lambda * VQ, every question reading the whole
batch bank through the codebook). The ``cpu`` preset adds warm starts that made short CPU runs
read their memory (docs/METHOD.md, "Where this implementation departs"):

- ``probe_steps``: the first N steps train the reading path on an answer probe (objectives.py)
  instead of the QA loss;
- ``float_memory_steps`` (MBC): for the first N steps the bank holds the encoder's float vectors,
  as MAC's does; then the codebook is fitted to them by k-means and training goes on through it;
- ``hold_reading_steps``: the first N QA steps after the probe train only the LLM side (prefix,
  KV-LoRA); the reading path is held, so that a QA loss still far from any answer does not scramble
  the memory the probe taught to carry answers before the LLM side has learned to read it; with
  input-side reading (vocabulary codes) the codes are held and only the KV-LoRA reads them, which
  spares the backward pass through the LLM's lower layers;
- ``teach_reading_steps``: over the last N probe steps the LLM side (prefix, KV-LoRA) also trains on
  the QA loss, reading the modulation (no gradient back) plus a hint: the direction of the answer's
  first token in the LLM's output embedding, the probe's target, at a strength falling from the
  modulation's own norm to 0. The LLM side thus learns to read the direction in which the probe
  puts the answer before the QA loss reaches the reading path;
- ``bank_curriculum_steps``: each question's bank grows from its own document to the whole batch;
- ``naming_steps`` (vocabulary codes): the first N steps also train each document slot to name one
  of the document's answer tokens (naming.py), at ``naming_weight``; ``naming_only_steps``: the
  first N train that alone (with the commitment term), with no LLM pass, before the QA loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from mbc.errors import MBCError

ProbeTokens = Literal["first", "all"]
PROBE_TOKENS = get_args(ProbeTokens)
OBJECTIVES = ("qa", "probe", "name")


@dataclass(frozen=True)
class Step:
    """What one training step computes (objectives.StepObjective reads it)."""

    objective: str = (
        "qa"  # "qa": QA loss (+ probe_weight x probe); "probe": the answer probe alone; "name": naming alone
    )
    float_memory: bool = False  # the bank holds float vectors, not codes (MBC before the codebook fit)
    bank_size: int | None = None  # documents each question sees (its own first); None = the whole batch
    probe_tokens: str = "first"
    probe_weight: float = 0.0
    backprop_keep: float = 1.0  # the reference's backprop dropout: the share of documents amortized with gradients
    hold_reading: bool = False  # the reading path (and the codebook) get no gradient this step
    measure_gap: bool = False  # also compute the loss with each question reading another document (no gradient)
    teach_reading: float = 0.0  # probe steps: also train the LLM side on the QA loss with this much answer hint
    naming_weight: float = 0.0  # vocabulary codes: the weight of naming the document's answer tokens (naming.py)
    naming_temperature: float = 0.05


class Schedule:
    def __init__(self, config, total_steps: int, quantize: bool):
        """``config``: a TrainConfig; its settings are checked against the run's ``total_steps``."""
        if quantize and config.float_memory_steps >= total_steps:
            raise MBCError(
                f"float_memory_steps={config.float_memory_steps} is not below the run's {total_steps} steps: "
                "the codebook would never be fitted; lower float_memory_steps or raise max_steps"
            )
        if config.probe_steps >= total_steps:
            raise MBCError(
                f"probe_steps={config.probe_steps} is not below the run's {total_steps} steps: "
                "the QA loss would never be trained; lower probe_steps or raise max_steps"
            )
        if config.naming_only_steps >= total_steps:
            raise MBCError(
                f"naming_only_steps={config.naming_only_steps} is not below the run's {total_steps} steps: "
                "the QA loss would never be trained; lower naming_only_steps or raise max_steps"
            )
        if config.teach_reading_steps > config.probe_steps:
            raise MBCError(
                f"teach_reading_steps={config.teach_reading_steps} is more than probe_steps={config.probe_steps}: "
                "the LLM side is taught during the probe steps; lower teach_reading_steps or raise probe_steps"
            )
        self.config, self.total_steps, self.quantize = config, total_steps, quantize

    def float_memory(self, step: int) -> bool:
        """Whether the codebook is still bypassed at this step (it is fitted once the step count reaches float_memory_steps)."""
        return self.quantize and step < self.config.float_memory_steps

    def _holds_reading(self, step: int) -> bool:
        """Whether ``step`` is one of the first ``hold_reading_steps`` QA steps."""
        first_qa = max(self.config.probe_steps, self.config.naming_only_steps)
        return first_qa <= step < first_qa + self.config.hold_reading_steps

    def at(self, step: int, documents: int, float_memory: bool) -> Step:
        """The step about to run (``step`` optimizer steps done) on a batch of ``documents``;
        ``float_memory``: whether the codebook is still unfitted (the trainer knows: a run stopped
        early fits it before saving)."""
        config = self.config
        objective = "name" if step < config.naming_only_steps else "probe" if step < config.probe_steps else "qa"
        return Step(
            objective,
            float_memory,
            self._bank_size(step, documents),
            config.probe_tokens,
            config.probe_weight,
            config.backprop_keep,
            self._holds_reading(step),
            config.gap_every > 0 and (step + 1) % config.gap_every == 0,
            self._teach_reading(step),
            config.naming_weight if step < max(config.naming_steps, config.naming_only_steps) else 0.0,
            config.naming_temperature,
        )

    def _teach_reading(self, step: int) -> float:
        """The answer hint's strength over the last teach_reading_steps probe steps: 1 falling to 0."""
        steps, end = self.config.teach_reading_steps, self.config.probe_steps
        if not end - steps <= step < end:
            return 0.0
        return (end - step) / steps

    def _bank_size(self, step: int, documents: int) -> int | None:
        steps = self.config.bank_curriculum_steps
        if steps <= 0:
            return None
        return min(documents, 1 + int((documents - 1) * step / steps))

"""Decoding with a soft prefix and a KV cache: greedy, beam search and diverse (group) beam search.

transformers 5.x moved group beam search out of the library (to hub-hosted code that is not
reachable offline), so it is written here, after Vijayakumar et al. 2016 ("Diverse Beam Search")
and transformers 4.x's ``group_beam_search``: the beams are split into groups; at each step the
groups choose their tokens one after another, and a group's log-probabilities are lowered by
``diversity_penalty`` times the number of times each token was already chosen by earlier groups
at this step (Hamming diversity). Plain beam search is the one-group case.

The prompt is left-padded; position ids follow the attention mask, so padding never shifts a
question's positions. The prefix stays outside the KV cache (see prefix.py), so reordering the
cache for beams leaves it alone.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import torch
from torch import nn

from mbc.errors import MBCError
from mbc.network.llm_layout import LLMLayout
from mbc.network.prefix import keep_prefix_rows, prefix_in, repeat_prefix
from mbc.settings import Field, settings

Strategy = Literal["greedy", "beam", "diverse_beam"]
STRATEGIES = get_args(Strategy)


@settings
class DecodingConfig:
    strategy: Strategy = "greedy"
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 16
    num_beams: Annotated[int, Field(ge=1, le=256)] = 12  # beam / diverse_beam
    num_beam_groups: Annotated[int, Field(ge=1, le=256)] = 4  # diverse_beam only
    diversity_penalty: Annotated[float, Field(ge=0)] = 10.0  # diverse_beam only
    length_penalty: float = 1.0

    def __post_init__(self):
        if self.strategy == "diverse_beam" and self.num_beams % self.num_beam_groups:
            raise MBCError(
                f"num_beams ({self.num_beams}) must be a multiple of num_beam_groups ({self.num_beam_groups})"
            )


def _forward(llm: nn.Module, input_ids, attention_mask, cache):
    """Next-token logits [batch, vocab] for the last position, and the updated cache. Only the last
    position is projected onto the vocabulary (SmolLM2's output layer is a fifth of its weights):
    the main job's gold-document prompts took 345 instead of 281 ms per question projecting every one."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
    out = llm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float(), out.cache


def _extend(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)


def _cut_at_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


class FirstLine:
    """Ends a row at the end of its first line of text: answers are one line (MBCModel.generate cuts
    them at the first newline after leading whitespace), so what comes after it is never read, and a
    few-shot prompt would otherwise run on to its next "Question:" until max_new_tokens.

    A row stops at a token holding a newline once some text other than whitespace came before the
    newline (in the row or in that token); special tokens count as no text, as they are not shown.
    """

    def __init__(self, tokenizer, vocab_size: int):
        known = min(vocab_size, len(tokenizer))  # an output layer may be padded past the tokenizer's vocabulary
        texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=True)
        texts += [""] * (vocab_size - known)
        # A byte-level token holding part of a character decodes to U+FFFD alone; it may be part of a
        # space (U+00A0), so it counts as no text: a row then ends later, never at a different answer.
        shown = [t if "\ufffd" not in t else "" for t in texts]
        self.newline = torch.tensor(["\n" in t for t in texts])
        self.text_before_newline = torch.tensor([t.split("\n")[0].strip() != "" for t in shown])
        self.text = torch.tensor([t.strip() != "" for t in shown])

    def start(self, rows: int) -> "FirstLine.Rows":
        return FirstLine.Rows(self, rows)

    class Rows:
        def __init__(self, table: "FirstLine", rows: int):
            self.table, self.seen_text = table, torch.zeros(rows, dtype=torch.bool)

        def ended(self, tokens: torch.Tensor) -> torch.Tensor:
            """Which rows' first line ends with ``tokens`` (each row's next token)."""
            tokens, table = tokens.cpu(), self.table
            ended = table.newline[tokens] & (self.seen_text | table.text_before_newline[tokens])
            self.seen_text |= table.text[tokens]
            return ended


@torch.no_grad()
def generate(
    llm: nn.Module,
    layout: LLMLayout,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None,
    eos_token_id: int,
    config: DecodingConfig | None = None,
    first_line: FirstLine | None = None,
    shared: int = 0,
) -> list[list[int]]:
    """Generated token ids per prompt, without the EOS token; greedy rows also end where
    ``first_line`` says their first line does (beam search ranks whole continuations: not cut).
    ``shared``: as ``greedy``'s (beam search takes 0)."""
    config = config or DecodingConfig()
    if config.strategy == "greedy":
        return greedy(
            llm, layout, input_ids, attention_mask, prefix, eos_token_id, config.max_new_tokens, first_line, shared
        )
    if shared:
        raise MBCError("beam search runs whole prompts: give shared=0")
    groups = config.num_beam_groups if config.strategy == "diverse_beam" else 1
    penalty = config.diversity_penalty if config.strategy == "diverse_beam" else 0.0
    ranked = beam_search(
        llm,
        layout,
        input_ids,
        attention_mask,
        prefix,
        eos_token_id,
        config.max_new_tokens,
        config.num_beams,
        groups,
        penalty,
        config.length_penalty,
    )
    return [_cut_at_eos(hypotheses[0][1], eos_token_id) for hypotheses in ranked]


def shared_length(prompts: list[list[int]]) -> int:
    """How many first tokens every prompt shares (each keeps at least one of its own)."""
    shortest = min(len(p) for p in prompts)
    for index in range(shortest - 1):
        if any(p[index] != prompts[0][index] for p in prompts):
            return index
    return max(shortest - 1, 0)


def greedy(llm, layout, input_ids, attention_mask, prefix, eos_token_id, max_new_tokens, first_line=None, shared=0):
    """Generated token ids per prompt (a list of lists), without the EOS token.

    ``shared``: the first ``shared`` columns hold the same tokens in every row, unpadded (the rest
    of each prompt follows them, left-padded): they run once, for one row, and every row attends to
    their keys and values. A few-shot prompt's worked examples are then not run once per question."""
    rows, device = input_ids.shape[0], input_ids.device
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    running = torch.arange(rows, device=device)  # the rows still in the LLM's batch
    lines = first_line.start(rows) if first_line is not None else None
    steps = []
    with prefix_in(layout, prefix):
        cache = None
        if shared > 0:
            if prefix is not None:
                raise MBCError("a shared prompt start is run for one row: it cannot carry per-row soft prefixes")
            _, cache = _forward(llm, input_ids[:1, :shared], attention_mask[:1, :shared], None)
            cache.batch_repeat_interleave(rows)
        logits, cache = _forward(llm, input_ids[:, shared:], attention_mask, cache)
        for _ in range(max_new_tokens):
            tokens = torch.full((rows,), eos_token_id, dtype=torch.long, device=device)
            tokens[running] = logits.argmax(dim=-1)
            steps.append(tokens)
            finished |= tokens == eos_token_id
            if lines is not None:
                finished |= lines.ended(tokens).to(device)
            if finished.all():
                break
            # Finished rows leave the batch (cache, mask and prefix rows): most answers end within a
            # few tokens, and the rows still running need not carry a batch of finished ones.
            keep = (~finished[running]).nonzero().squeeze(1)
            if len(keep) < len(running):
                running, attention_mask = running[keep], attention_mask[keep]
                cache.batch_select_indices(keep)
                keep_prefix_rows(layout, keep)
            attention_mask = _extend(attention_mask)
            logits, cache = _forward(llm, tokens[running, None], attention_mask, cache)
    generated = torch.stack(steps, dim=1).tolist()
    return [_cut_at_eos(row, eos_token_id) for row in generated]


class _Hypotheses:
    """The finished hypotheses of one beam group of one prompt (at most ``size``, best kept)."""

    def __init__(self, size: int, length_penalty: float):
        self.size, self.length_penalty, self.items = size, length_penalty, []

    def add(self, tokens: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / max(len(tokens), 1) ** self.length_penalty
        self.items.append((score, tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.size :]

    def is_done(self, best_running_sum: float, length: int) -> bool:
        # No running beam can beat the worst kept hypothesis any more (scores only fall with length).
        if len(self.items) < self.size:
            return False
        return self.items[-1][0] >= best_running_sum / max(length, 1) ** self.length_penalty


def beam_search(
    llm,
    layout,
    input_ids,
    attention_mask,
    prefix,
    eos_token_id: int,
    max_new_tokens: int,
    num_beams: int,
    num_groups: int = 1,
    diversity_penalty: float = 0.0,
    length_penalty: float = 1.0,
) -> list[list[tuple[float, list[int]]]]:
    """Per prompt, every final hypothesis of every group as (score, tokens), best first."""
    batch, device = input_ids.shape[0], input_ids.device
    per_group = num_beams // num_groups
    input_ids = input_ids.repeat_interleave(num_beams, dim=0)
    attention_mask = attention_mask.repeat_interleave(num_beams, dim=0)
    prefix = repeat_prefix(prefix, num_beams) if prefix else prefix
    # Only the first beam of each group is live at the start, so a group does not pick the same
    # token num_beams times from identical copies of the prompt.
    beam_scores = torch.zeros(batch, num_groups, per_group, device=device)
    beam_scores[:, :, 1:] = -1e9
    sequences = input_ids.new_zeros(batch * num_beams, 0)
    hypotheses = [[_Hypotheses(per_group, length_penalty) for _ in range(num_groups)] for _ in range(batch)]
    done = torch.zeros(batch, num_groups, dtype=torch.bool)
    with prefix_in(layout, prefix):
        logits, cache = _forward(llm, input_ids, attention_mask, None)
        for step in range(max_new_tokens):
            logprobs = torch.log_softmax(logits, dim=-1).view(batch, num_groups, per_group, -1)
            vocab = logprobs.shape[-1]
            next_tokens = torch.full((batch, num_groups, per_group), eos_token_id, dtype=torch.long)
            next_beams = torch.arange(per_group).repeat(batch, num_groups, 1)
            next_scores = beam_scores.clone()
            chosen_so_far = torch.zeros(batch, vocab, device=device)
            for group in range(num_groups):
                scores = (
                    logprobs[:, group] - diversity_penalty * chosen_so_far[:, None, :] + beam_scores[:, group, :, None]
                )
                top_scores, top_ids = scores.view(batch, -1).topk(2 * per_group, dim=1)
                top_scores, top_ids = top_scores.tolist(), top_ids.tolist()
                for b in range(batch):
                    if done[b, group]:
                        continue
                    kept = 0
                    for rank, (score, flat_id) in enumerate(zip(top_scores[b], top_ids[b])):
                        beam, token = divmod(flat_id, vocab)
                        row = b * num_beams + group * per_group + beam
                        if token == eos_token_id:
                            if rank < per_group:
                                hypotheses[b][group].add(sequences[row].tolist() + [token], score)
                            continue
                        next_tokens[b, group, kept], next_beams[b, group, kept], next_scores[b, group, kept] = (
                            token,
                            beam,
                            score,
                        )
                        kept += 1
                        if kept == per_group:
                            break
                    done[b, group] = hypotheses[b][group].is_done(max(top_scores[b]), step + 1)
                    chosen_so_far[b].index_add_(
                        0, next_tokens[b, group].to(device), torch.ones(per_group, device=device)
                    )
            rows = (
                (
                    torch.arange(batch)[:, None, None] * num_beams
                    + torch.arange(num_groups)[None, :, None] * per_group
                    + next_beams
                )
                .flatten()
                .to(device)
            )
            sequences = torch.cat([sequences[rows], next_tokens.flatten().to(device)[:, None]], dim=1)
            beam_scores = next_scores
            if done.all() or step == max_new_tokens - 1:
                break
            cache.reorder_cache(rows)
            attention_mask = _extend(attention_mask)
            logits, cache = _forward(llm, sequences[:, -1:], attention_mask, cache)
    return _ranked(hypotheses, sequences, beam_scores, done, num_beams, per_group)


def _ranked(hypotheses, sequences, beam_scores, done, num_beams, per_group):
    results = []
    for b, groups in enumerate(hypotheses):
        for group, hyps in enumerate(groups):
            if not done[b, group]:  # ran out of steps: running beams compete with the finished ones
                for beam in range(per_group):
                    hyps.add(
                        sequences[b * num_beams + group * per_group + beam].tolist(), beam_scores[b, group, beam].item()
                    )
        results.append(sorted((item for hyps in groups for item in hyps.items), key=lambda item: -item[0]))
    return results

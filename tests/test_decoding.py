import pytest
import torch
from conftest import DOCUMENTS, QUESTIONS, TINY_MODELS

from mbc import DecodingConfig, MBCError
from mbc.network.decoding import FirstLine, beam_search, generate, greedy, shared_length
from mbc.network.llm_layout import describe_llm
from mbc.network.prefix import enable_prefix_attention, prefix_in


def _tiny_llm(family: str):
    torch.manual_seed(0)
    model = TINY_MODELS[family]().eval()
    ids = torch.randint(3, 259, (3, 6))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # a left-padded prompt
    return model, ids, mask


def _hf(model, ids, mask, eos, **kwargs):
    model.set_attn_implementation("sdpa")
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=8,
        pad_token_id=0,
        eos_token_id=eos,
        **kwargs,
    )
    enable_prefix_attention(model)
    return [row[ids.shape[1] :].tolist() for row in out]


def _strip(rows, eos):
    return [row[: row.index(eos)] if eos in row else row for row in rows]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_transformers_greedy_without_prefix(family):
    model, ids, mask = _tiny_llm(family)
    layout = describe_llm(model)
    first_tokens = _hf(model, ids, mask, eos=1)
    for eos in (1, first_tokens[1][3], first_tokens[2][0]):  # never hit, hit mid-way, hit at once
        expected = _strip(_hf(model, ids, mask, eos), eos)
        assert greedy(model, layout, ids, mask, None, eos, 8) == expected


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_beam_search_equals_transformers_beam_search_without_prefix(family):
    model, ids, mask = _tiny_llm(family)
    layout = describe_llm(model)
    greedy_tokens = _hf(model, ids, mask, eos=1)
    for eos in (1, greedy_tokens[1][2]):
        expected = _strip(_hf(model, ids, mask, eos, num_beams=4), eos)
        ours = generate(model, layout, ids, mask, None, eos, DecodingConfig("beam", max_new_tokens=8, num_beams=4))
        assert ours == expected


def test_greedy_with_prefix_and_cache_equals_recomputing_without_cache(tiny_model):
    model = tiny_model("llama").eval()
    torch.nn.init.normal_(model.prefix_expansion.blocks.w2)  # a prefix that is not zero (training starts it at zero)
    prefix = model.prefix(model.modulation(QUESTIONS, model.memory(model.compress(DOCUMENTS))))
    ids = torch.tensor([[0, 0, 40, 41, 42], [50, 51, 52, 53, 54]])
    mask = (ids != 0).long()
    cached = greedy(model.llm.model, model.llm.layout, ids, mask, prefix, eos_token_id=1, max_new_tokens=6)
    expected = []
    with prefix_in(model.llm.layout, prefix):
        seq, m = ids, mask
        for _ in range(6):
            position_ids = (m.cumsum(-1) - 1).clamp(min=0)
            nxt = model.llm.model(input_ids=seq, attention_mask=m, position_ids=position_ids).logits[:, -1].argmax(-1)
            seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(nxt[:, None])], 1)
        expected = [row[ids.shape[1] :].tolist() for row in seq]
    assert cached == _strip(expected, 1)
    with prefix_in(model.llm.layout, prefix):
        prefixed = model.llm.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(
        prefixed, model.llm.model(input_ids=ids, attention_mask=mask).logits
    )  # the prefix matters


def test_rows_that_finish_leave_the_batch_and_the_others_keep_their_own_prefix(tiny_model):
    model = tiny_model("llama").eval()
    torch.nn.init.normal_(model.prefix_expansion.blocks.w2)
    prefix = model.prefix(model.modulation(QUESTIONS, model.memory(model.compress(DOCUMENTS))))

    def run(ids, eos, rows=(0, 1)):
        mask = (ids != 0).long()
        rows_prefix = [(k[list(rows)], v[list(rows)]) for k, v in prefix]
        return greedy(model.llm.model, model.llm.layout, ids, mask, rows_prefix, eos_token_id=eos, max_new_tokens=6)

    # A second prompt such that some token is in one row's answer and not the other's: with that
    # token as EOS, one row ends mid-way and the other runs on alone.
    ids = torch.tensor([[0, 0, 40, 41, 42], [50, 51, 52, 53, 54]])
    for start in range(50, 250, 5):
        ids[1] = torch.arange(start, start + 5)
        first = run(ids, eos=1)
        only = [(token, row) for row in (0, 1) for token in first[row][:5] if token not in first[1 - row]]
        if only:
            break
    else:
        pytest.fail("no pair of prompts whose answers differ in a token")
    eos, ends = only[0]
    batched = run(ids, eos)
    alone = [run(ids[i : i + 1], eos, rows=(i,))[0] for i in range(2)]
    assert batched == alone and len(batched[ends]) < 5 and len(batched[1 - ends]) == 6


def test_diverse_beam_groups_choose_different_tokens():
    model, ids, mask = _tiny_llm("llama")
    layout = describe_llm(model)
    plain = beam_search(model, layout, ids, mask, None, 1, 1, num_beams=8, num_groups=4, diversity_penalty=0.0)
    diverse = beam_search(model, layout, ids, mask, None, 1, 1, num_beams=8, num_groups=4, diversity_penalty=1e4)
    for ranked_plain, ranked_diverse in zip(plain, diverse):
        assert len({tuple(t) for _, t in ranked_plain}) == 2  # identical groups repeat each other
        assert len({tuple(t) for _, t in ranked_diverse}) == 8  # each group is pushed off earlier groups' tokens


def test_paper_decoding_runs_batched_with_prefix(tiny_model):
    model = tiny_model("gpt2").eval()
    memory = model.memory(model.compress(DOCUMENTS))
    answers = model.answer(
        QUESTIONS, memory, DecodingConfig("diverse_beam", max_new_tokens=5, num_beams=12, num_beam_groups=4)
    )
    assert len(answers) == 2


def test_decoding_config_rejects_bad_settings():
    with pytest.raises(MBCError, match="strategy must be one of"):
        DecodingConfig("nucleus")
    with pytest.raises(MBCError, match="multiple of num_beam_groups"):
        DecodingConfig("diverse_beam", num_beams=10, num_beam_groups=4)


def test_first_line_ends_a_row_at_its_first_newline_after_some_text(tiny_model):
    tokenizer = tiny_model().llm.tokenizer  # byte-level: one token per byte
    first_line = FirstLine(tokenizer, len(tokenizer) + 3)  # an output layer padded past the vocabulary

    def end_of(text: str) -> int | None:
        rows = first_line.start(1)
        for index, token in enumerate(tokenizer(text)["input_ids"]):
            if rows.ended(torch.tensor([token]))[0]:
                return index
        return None

    assert end_of("ab\ncd\n") == 2
    assert end_of("\n \n ab\nc") == 6  # leading blank lines are not the answer's line
    assert end_of(" abc") is None
    assert end_of("<eos>\nab\n") == 4  # a special token is no text (it is not shown)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ending_at_the_first_line_changes_no_answer(tiny_model, family):
    model = tiny_model(family).eval()
    prompts = [model.llm.tokenizer(p)["input_ids"] for p in ["Q: a\nA:", "x\n\ny", "hello", "1\n2\n3"]]
    torch.manual_seed(0)
    answers = []
    for first_line in (None, FirstLine(model.llm.tokenizer, model.llm.model.get_output_embeddings().weight.shape[0])):
        model._first_line = first_line if first_line is not None else _NeverEnds()
        answers.append(model.llm.generate(prompts, None, DecodingConfig(max_new_tokens=16)))
    assert answers[0] == answers[1]


class _NeverEnds:
    def start(self, rows):
        return self

    def ended(self, tokens):
        return torch.zeros(len(tokens), dtype=torch.bool)


def test_shared_length_leaves_every_prompt_a_token_of_its_own():
    assert shared_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_length([[7], [7, 8]]) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompts_that_start_alike_give_the_same_answers_with_their_start_run_once(tiny_model, family, monkeypatch):
    from mbc.network import frozen_llm as model_module

    model = tiny_model(family).eval()
    start = "Question: what? Answer: this.\n\nQuestion: and? Answer: that.\n\n"
    prompts = [model.llm.tokenizer(start + q)["input_ids"] for q in ["Question: a b?", "Question: c?", "Q: defgh ij?"]]
    assert shared_length(prompts) >= model_module.SHARED_START_TOKENS
    runs = []
    forward = model.llm.model.forward
    monkeypatch.setattr(
        model.llm.model, "forward", lambda *a, **k: runs.append(k["input_ids"].shape) or forward(*a, **k)
    )
    shared = model.llm.generate(prompts, None, DecodingConfig(max_new_tokens=6))
    assert runs[0] == (1, shared_length(prompts))  # the common start, for one row
    monkeypatch.setattr(model_module, "SHARED_START_TOKENS", 10**6)  # never shared
    runs.clear()
    assert model.llm.generate(prompts, None, DecodingConfig(max_new_tokens=6)) == shared
    assert runs[0] == (3, max(len(p) for p in prompts))

"""The token memory (token_memory.py): which tokens a document keeps, the bank it writes, reading it
back, saving, and its methods in the online evaluation and the memory service, on tiny models."""

import json
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn
from typer.testing import CliRunner

from mbc.bank import BankLayout, MemoryBank
from mbc.bank.packing import packed_size
from mbc.cli import app
from mbc.data import documents
from mbc.data.generated import generate_examples
from mbc.errors import MBCError
from mbc.evaluation.online import EvalConfig, run_eval
from mbc.memory.ingest import ingest
from mbc.memory.readers import reader_for
from mbc.memory.service import MemoryService
from mbc.memory.sources import Document
from mbc.model import MBCModel
from mbc.network.lora import lora_disabled
from mbc.prompts import context_prompt
from mbc.token_memory import TokenMemory, TokenMemoryConfig, is_token_memory
from mbc.training.run import TrainingInterrupted
from mbc.training.state import saved_progress
from mbc.training.token_memory import answer_labels, fit_scorer, train_reader, train_token_memory

KEYS = dict(retrieval_top_k=1, retrieval_subspaces=4, retrieval_codes=4)


@pytest.fixture(scope="module")
def rows():
    return generate_examples(8, seed=3)  # 8 documents, 6 questions each


@pytest.fixture(scope="module")
def token_memory(tiny_paths, rows):
    config = TokenMemoryConfig(keep=12, layer=2, base=tiny_config(tiny_paths, **KEYS).to_dict())
    torch.manual_seed(0)
    return train_token_memory(rows, config, before=1, steps=50)


def test_labels_mark_answer_tokens_and_the_tokens_just_before_them():
    text = "Mira Okafor founded it in 1987."
    spans = [(0, 4), (4, 11), (11, 19), (19, 22), (22, 25), (25, 30), (30, 31)]  # words as tokens
    assert answer_labels(text, spans, {"1987"}).tolist() == [0, 0, 0, 0, 0, 1, 0]
    assert answer_labels(text, spans, {"1987", "Okafor"}, before=2).tolist() == [1, 1, 0, 1, 1, 1, 0]


def test_the_scorer_learns_a_separable_label_and_folds_the_standardisation_into_its_weights():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2000, 6, generator=generator) * 5 + 3  # far from standardised
    labels = (features[:, 2] > 4).float()
    scorer = nn.Linear(6, 1)
    fit_scorer(scorer, features, labels, steps=300)
    with torch.no_grad():
        scores = scorer(features).squeeze(1)  # on the raw features: the standardisation is in the weights
    # What keeping the top K needs is the order: nearly every answer token above every other one.
    ordered = (scores[labels == 1][:, None] > scores[labels == 0][None]).float().mean()
    assert ordered > 0.95  # (unfolded or unlearned: about 0.5)


def test_a_document_keeps_its_best_tokens_in_order_and_a_short_one_keeps_all(token_memory, rows):
    long_text, short_text = rows[0].document, "Tam 42."
    entries = token_memory.compress([long_text, short_text])
    assert entries.shape == (2, 12, 1)
    ids = token_memory.llm.tokenizer(long_text)["input_ids"]
    kept = token_memory.codec.decode(entries)[0]
    assert len(kept) == 12
    position = 0
    for token in kept:  # a subsequence of the document's own tokens
        position = ids.index(token, position) + 1
    assert token_memory.texts(entries)[1] == short_text  # padded, and the padding dropped again


def test_a_token_bank_stores_2_bytes_a_token_at_most_and_no_code_counts(token_memory, rows):
    layout = BankLayout.of(token_memory)
    assert layout.mode == "tokens" and layout.entry_bytes == packed_size(12, len(token_memory.llm.tokenizer) + 1)
    with MemoryBank.in_memory(layout) as bank:
        ingest(token_memory, bank, documents(rows))
        assert bank.sizes()["codebook_bytes"] == 0
        assert bank.storage.execute("SELECT COUNT(*) FROM code_counts").fetchone()[0] == 0
        with pytest.raises(MBCError, match="code counts exist only"):
            bank.code_counts()


def test_a_question_reads_the_kept_tokens_of_its_top_document(token_memory, rows, monkeypatch):
    prompts = []
    answer = token_memory.continue_prompts
    monkeypatch.setattr(token_memory, "continue_prompts", lambda p, d=None: prompts.extend(p) or answer(p, d))
    with MemoryBank.in_memory(BankLayout.of(token_memory)) as bank:
        ingest(token_memory, bank, documents(rows))
        reader = reader_for(token_memory, bank)
        questions = [r.question for r in rows[:6]]
        answers, read = token_memory.answer_read(reader, questions)
        assert len(answers) == 6 and all(len(ids) == 1 for ids in read)
        expected = [context_prompt(token_memory.texts(bank.entries(ids))[0], q) for ids, q in zip(read, questions)]
    assert sorted(prompts) == sorted(token_memory.llm.tokenizer(p)["input_ids"] for p in expected)


def test_saved_and_loaded_it_keeps_the_same_tokens_and_is_refused_as_an_mbc_adapter(token_memory, rows, tmp_path):
    token_memory.save_pretrained(tmp_path / "tokens")
    assert is_token_memory(tmp_path / "tokens")
    loaded = TokenMemory.from_pretrained(tmp_path / "tokens")
    assert loaded.bank_fingerprint() == token_memory.bank_fingerprint()
    assert np.array_equal(loaded.compress(documents(rows)), token_memory.compress(documents(rows)))
    with pytest.raises(MBCError, match="holds a token memory"):
        MBCModel.from_pretrained(tmp_path / "tokens")


def test_a_bank_written_by_one_token_memory_is_refused_by_another(token_memory, tmp_path):
    with MemoryBank.open(tmp_path / "bank.db", BankLayout.of(token_memory)):
        pass
    other = TokenMemory(token_memory.config, token_memory.llm, token_memory.retrieval_keys)
    nn.init.ones_(other.scorer.weight)
    with pytest.raises(MBCError, match="token scorer"):
        MemoryBank.open(tmp_path / "bank.db", BankLayout.of(other))


def test_eval_runs_the_token_memory_and_its_unrelated_control(token_memory, tiny_model, rows, tmp_path):
    unrelated = documents(generate_examples(8, seed=4))
    config = EvalConfig(batch_size=8, methods=["tokens", "tokens, unrelated bank", "base, 3 worked examples"])
    summary = run_eval(None, rows[:30], unrelated, tmp_path, config, tokens=token_memory)  # no MBC adapter needed
    assert list(summary["methods"]) == ["base, 3 worked examples", "tokens", "tokens, unrelated bank"]
    stored = packed_size(12, len(token_memory.llm.tokenizer) + 1) + packed_size(4, 4)  # tokens and retrieval key
    for name in ("tokens", "tokens, unrelated bank"):
        assert summary["methods"][name]["bytes_per_document"] == stored
    assert 0 <= summary["banks"]["tokens"]["retrieval_recall_percent"] <= 100
    config = EvalConfig(batch_size=8, methods=["tokens", "tokens, unrelated bank"])
    with pytest.raises(MBCError, match="'tokens' a token memory"):
        run_eval(tiny_model().eval(), rows[:6], unrelated, tmp_path / "none", config)  # and none given


def test_the_memory_service_adds_to_and_answers_from_a_token_memory(token_memory, rows, tmp_path):
    token_memory.save_pretrained(tmp_path / "tokens")
    service = MemoryService.open(tmp_path / "bank.db", tmp_path / "tokens")
    report = service.add([Document(text, {"path": f"doc{i}"}) for i, text in enumerate(documents(rows))])
    assert report.added == 8
    result = service.ask([rows[0].question])
    assert result["answers"][0]["documents"][0]["metadata"]["path"].startswith("doc")
    assert service.stats()["mode"] == "tokens"


def test_the_retention_command_streams_into_a_token_memory_beside_mbc(
    token_memory, tiny_checkpoint, tmp_path, monkeypatch
):
    token_memory.save_pretrained(tmp_path / "tokens")
    out = tmp_path / "out"
    args = ["retention", "--model", tiny_checkpoint, "--data", "generated:3:20", "--every", "8", "--output", str(out)]
    result = CliRunner().invoke(app, [*args, "--tokens", str(tmp_path / "tokens")])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "retention.json").read_text())
    assert list(saved["curves"]) == ["mbc", "tokens"] and saved["checkpoints"]["tokens"] == str(tmp_path / "tokens")
    assert [p["documents"] for p in saved["curves"]["tokens"]] == [8, 16, 20]
    assert all(0 <= p["recall_percent"] <= 100 for p in saved["curves"]["tokens"])  # it reads by retrieval key
    assert "tokens F1" in result.output
    wrong = CliRunner().invoke(app, [*args, "--tokens", tiny_checkpoint])
    assert wrong.exit_code != 0 and "not a token memory" in str(wrong.exception)
    monkeypatch.setenv("MBC_CACHE", str(tmp_path / "empty-cache"))  # no main job's adapter: the token curve alone
    alone = CliRunner().invoke(
        app, ["retention", *args[3:-1], str(tmp_path / "alone"), "--tokens", str(tmp_path / "tokens")]
    )
    assert alone.exit_code == 0 and "no MBC adapter cached" in alone.output, alone.output
    assert list(json.loads((tmp_path / "alone" / "retention.json").read_text())["curves"]) == ["tokens"]


def test_a_token_memory_needs_retrieval_keys_and_a_layer_of_its_llm(tiny_paths):
    with pytest.raises(MBCError, match="retrieval_top_k > 0"):
        TokenMemoryConfig(base=tiny_config(tiny_paths).to_dict())
    with pytest.raises(MBCError, match="outside the base LLM"):
        TokenMemory.build(TokenMemoryConfig(layer=9, base=tiny_config(tiny_paths, **KEYS).to_dict()))


def test_keeping_fewer_tokens_keeps_the_best_of_those_kept_before(token_memory, rows):
    texts = documents(rows)
    fewer = token_memory.keeping(4)
    assert fewer.compress(texts).shape == (len(texts), 4, 1)
    for small, large in zip(fewer.kept_ids(texts), token_memory.kept_ids(texts)):
        position = 0
        for token in small:  # top 4 of the same scores: a subsequence of the top 12
            position = large.index(token, position) + 1
    assert BankLayout.of(fewer) != BankLayout.of(token_memory)  # a bank of one refuses the other


def test_a_question_reads_the_document_that_shares_its_rare_tokens_when_the_lexical_weight_leads(token_memory):
    # The tiny LLM's tokens are bytes. Shorter than the 12 kept tokens, each document is kept whole
    # whatever the scorer learned; only its first two letters tell it from the others.
    names = ["Zq", "Xj", "Vw", "Kb", "Yf", "Gp"]
    texts = [f"{name} lamp." for name in names]
    questions = [f"{name}?" for name in names]
    lexical = TokenMemory(
        replace(token_memory.config, lexical_weight=10.0), token_memory.llm, token_memory.retrieval_keys
    )
    lexical.scorer = token_memory.scorer
    keyed = TokenMemory(replace(token_memory.config, lexical_weight=0.0), token_memory.llm, token_memory.retrieval_keys)
    keyed.scorer = token_memory.scorer
    with MemoryBank.in_memory(BankLayout.of(lexical)) as bank:
        ids = ingest(lexical, bank, texts).ids
        assert reader_for(lexical, bank).top_ids(questions) == [[i] for i in ids]
        by_key = reader_for(keyed, bank).top_ids(questions)
        key_alone = token_memory.retrieval_keys.top(questions, torch.as_tensor(bank.retrieval_keys(ids)).long(), 1)
        assert by_key == [[ids[p] for p in row] for row in key_alone[:, :1].tolist()]


def test_the_kept_tokens_embedding_finds_a_document_that_neither_key_nor_bm25_tells_apart(token_memory, monkeypatch):
    # Every key scored alike and no token of the question in any document but the space they all
    # share: only the sentence embedding of each document's kept tokens, computed from the bank at
    # read time, can choose.
    texts = ["ab lamp.", "cd lamp.", "ef lamp."]
    dense = TokenMemory(
        replace(token_memory.config, lexical_weight=0.3, embedding_weight=1.0),
        token_memory.llm,
        token_memory.retrieval_keys,
    )
    dense.scorer = token_memory.scorer
    keys, embedder = token_memory.retrieval_keys, token_memory.retrieval_keys.embedder
    names = [("ab", "1"), ("cd", "2"), ("ef", "3")]  # a document's letters, or the digit that asks for it

    def embed(self, texts, batch_size=64):
        return torch.eye(3, self.dim)[[next(i for i, n in enumerate(names) if n[0] in t or n[1] in t) for t in texts]]

    monkeypatch.setattr(type(embedder), "forward", embed)
    monkeypatch.setattr(keys, "scores", lambda questions, stored: torch.zeros(len(questions), len(stored)))
    with MemoryBank.in_memory(BankLayout.of(dense)) as bank:
        ids = ingest(dense, bank, texts).ids
        assert reader_for(dense, bank).top_ids(["3 ?", "1 ?", "2 ?"]) == [[ids[2]], [ids[0]], [ids[1]]]
        without = TokenMemory(replace(dense.config, embedding_weight=0.0), dense.llm, keys)
        without.scorer = dense.scorer
        read = reader_for(without, bank).top_ids(["3 ?", "1 ?", "2 ?"])
        assert len({tuple(r) for r in read}) == 1  # every document ties for every question


def _fitted(tiny_paths, rows) -> TokenMemory:
    torch.manual_seed(0)
    config = TokenMemoryConfig(keep=12, layer=2, base=tiny_config(tiny_paths, **KEYS).to_dict())
    return train_token_memory(rows, config, before=1, steps=50)


@pytest.fixture(scope="module")
def with_reader(tiny_paths, rows):
    model = _fitted(tiny_paths, rows)
    untrained = {k: v.clone() for k, v in model.llm.state_dict().items()}
    losses = train_reader(model, rows[:8], steps=100, learning_rate=2e-2)  # one batch, learned by heart
    return model, untrained, losses


def test_training_the_reader_moves_only_the_llms_kv_lora_and_lowers_its_loss(with_reader):
    model, untrained, losses = with_reader
    assert model.config.trained_reader
    moved = {k for k, v in model.llm.state_dict().items() if not torch.equal(v, untrained[k])}
    assert moved and all(".lora_" in k for k in moved)  # the scorer, keys and LLM as they were
    assert any(".lora_B." in k for k in moved)  # B starts at zero: the reader did change the LLM
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.2  # ~5.5 -> ~5.2 nats on the tiny LLM


def test_the_reader_trains_under_bf16_autocast_and_keeps_float32_weights(tiny_paths, rows):
    model = _fitted(tiny_paths, rows)
    losses = train_reader(model, rows[:8], steps=100, learning_rate=2e-2, mixed_precision="bf16")
    adapters = [p for name, p in model.llm.model.named_parameters() if ".lora_" in name]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.2
    with pytest.raises(MBCError, match="mixed_precision must be one of 'no', 'bf16'; got 'fp16'"):
        train_reader(model, rows[:8], steps=1, mixed_precision="fp16")


def test_a_reader_saved_midway_continues_to_the_weights_of_an_unbroken_run(tiny_paths, rows, tmp_path):
    unbroken = _fitted(tiny_paths, rows)
    train_reader(unbroken, rows[:16], steps=6, learning_rate=2e-2)
    train_reader(_fitted(tiny_paths, rows), rows[:16], steps=3, learning_rate=2e-2, save_to=tmp_path / "reader")
    resumed = TokenMemory.from_pretrained(tmp_path / "reader")  # a usable memory, trained 3 steps
    assert resumed.config.trained_reader
    losses = train_reader(resumed, rows[:16], steps=6, learning_rate=2e-2, save_to=tmp_path / "reader")
    assert len(losses) == 6  # the 3 saved steps' losses and 3 more
    reloaded = TokenMemory.from_pretrained(tmp_path / "reader").trainable_state_dict()
    for name, tensor in unbroken.trainable_state_dict().items():
        # the frozen rows are recomputed after the break, in other batches: equal up to rounding
        assert torch.allclose(tensor, reloaded[name], atol=1e-4), name
    with pytest.raises(MBCError, match="learning_rate 0.02 -> 0.01"):
        train_reader(resumed, rows[:16], steps=8, learning_rate=1e-2, save_to=tmp_path / "reader")
    with pytest.raises(MBCError, match="keep 12 -> 10"):
        train_token_memory(
            rows, replace(unbroken.config, keep=10), before=1, reader_steps=8, save_to=tmp_path / "reader"
        )


def test_sigterm_stops_the_reader_at_the_end_of_its_step_saved(tiny_paths, rows, tmp_path, monkeypatch):
    model, steps_begun = _fitted(tiny_paths, rows), []
    loss_of = model.llm.qa_loss_from_lower

    def loss_then_sigterm_in_step_2(*args):
        steps_begun.append(1)
        if len(steps_begun) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill` or a session's end sends
        return loss_of(*args)

    monkeypatch.setattr(model.llm, "qa_loss_from_lower", loss_then_sigterm_in_step_2)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at reader step 2 of 6") as stopped:
        train_reader(model, rows[:16], steps=6, learning_rate=2e-2, save_to=tmp_path / "reader")
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert saved_progress(tmp_path / "reader")["step"] == 2 and len(steps_begun) == 2


def test_a_trained_reader_is_saved_with_the_memory_and_answers_through_its_kv_lora(with_reader, rows, tmp_path):
    model, _, _ = with_reader
    model.save_pretrained(tmp_path / "tokens")
    loaded = TokenMemory.from_pretrained(tmp_path / "tokens")
    assert loaded.config.trained_reader
    kept = model.codec.decode(model.compress(documents(rows)[:2]))
    prompts = [model.prompt_ids(codes, r.question) for codes, r in zip(kept, rows)]
    assert loaded.continue_prompts(prompts) == model.continue_prompts(prompts)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        read = model.llm.model(input_ids=ids).logits
        with lora_disabled(model.llm.model):  # the answers come through the trained KV-LoRA
            bare = model.llm.model(input_ids=ids).logits
    assert not torch.allclose(read, bare)


@pytest.fixture(scope="module")
def coded_memory(tiny_paths, rows):
    config = TokenMemoryConfig(layer=2, entry_bytes=10, base=tiny_config(tiny_paths, **KEYS).to_dict())
    torch.manual_seed(0)
    return train_token_memory(rows, config, before=1, steps=50)


def test_a_coded_entry_holds_the_best_scored_tokens_that_fit_its_bytes_in_document_order(coded_memory, rows):
    text = rows[0].document
    entries = coded_memory.compress([text, "Tam 42."])
    assert entries.shape == (2, 10, 1) and BankLayout.of(coded_memory).entry_bytes == 10
    kept, short = coded_memory.codec.decode(entries)
    assert coded_memory.texts(entries)[1] == "Tam 42."  # a short document whole
    coder = coded_memory.prefix_code.coder()
    assert coder.bits(kept) <= 80 and len(kept) > 80 // 16
    ids, _, features = coded_memory.token_features([text])[0]
    scores = coded_memory.scorer(features).squeeze(1)
    chosen = coded_memory.keep_positions(ids, features)
    assert [ids[i] for i in chosen] == kept  # in document order
    left_out = [i for i in range(len(ids)) if i not in chosen]
    assert all(  # nothing left out outscores a kept token unless its code would not fit
        scores[i] <= scores[chosen].min() or coder.lengths[ids[i]] > 80 - coder.bits(kept) for i in left_out
    )


def test_a_coded_memory_saves_its_code_and_answers_from_its_bank(coded_memory, rows, tmp_path):
    coded_memory.save_pretrained(tmp_path / "coded")
    loaded = TokenMemory.from_pretrained(tmp_path / "coded")
    assert np.array_equal(loaded.compress(documents(rows)), coded_memory.compress(documents(rows)))
    assert loaded.bank_fingerprint() == coded_memory.bank_fingerprint()
    other = TokenMemory(coded_memory.config, coded_memory.llm, coded_memory.retrieval_keys)
    other.scorer = coded_memory.scorer
    other.fit_code([[0, 1, 2]])  # another code: the same bytes would mean other tokens
    assert other.bank_fingerprint() != coded_memory.bank_fingerprint()
    with MemoryBank.in_memory(BankLayout.of(loaded)) as bank:
        ingest(loaded, bank, documents(rows))
        answers, read = loaded.answer_read(reader_for(loaded, bank), [r.question for r in rows[:4]])
    assert len(answers) == 4 and all(len(r) == 1 for r in read)


def test_an_unfitted_code_and_coded_written_codes_are_refused_in_one_line(coded_memory, tiny_paths):
    unfitted = TokenMemory(coded_memory.config, coded_memory.llm, coded_memory.retrieval_keys)
    with pytest.raises(MBCError, match="prefix code is not fitted"):
        unfitted.compress(["Tam 42 lamps."])
    with pytest.raises(MBCError, match="entry_bytes codes kept tokens"):
        TokenMemoryConfig(codes="written", entry_bytes=10, base=tiny_config(tiny_paths, **KEYS).to_dict())


def test_a_coded_bank_read_before_and_after_it_grows_by_documents_of_other_lengths(coded_memory, rows):
    coder = coded_memory.prefix_code.coder()
    tokenizer = coded_memory.llm.tokenizer
    by_length = np.argsort(coder.lengths[: coder.end], kind="stable")
    short = next(int(t) for t in by_length if tokenizer.decode([int(t)]).strip())
    many = tokenizer.decode([short] * 60)  # keeps more ids than its entry's 10 bytes
    with MemoryBank.in_memory(BankLayout.of(coded_memory)) as bank:
        reader = reader_for(coded_memory, bank)
        ingest(coded_memory, bank, ["Tam 42."])
        coded_memory.answer_read(reader, [rows[0].question])
        ingest(coded_memory, bank, [many, *documents(rows)[:2]])
        _, read = coded_memory.answer_read(reader, [rows[0].question, rows[6].question])
        kept = [len(ids) for ids in coded_memory.codec.decode(bank.entries(bank.ids()))]
    assert max(kept) > 10 and min(kept) < 10  # entries of more ids than bytes and of fewer
    assert reader.document_keys.shape == (4, 4 + coded_memory.codec.most_tokens) and len(read) == 2

"""Written codes (network/vocabulary.py, training/vocabulary_codes.py): MBC's codebook step on the
base LLM's own token table, in a token memory, on tiny models."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ANSWERS, DOCUMENTS, MORE_DOCUMENTS, QUESTIONS, tiny_config
from torch import nn

from mbc.bank import BankLayout, MemoryBank
from mbc.config import MBCConfig
from mbc.data import documents
from mbc.data.examples import QAExample
from mbc.data.generated import generate_examples
from mbc.errors import MBCError
from mbc.evaluation.online import EvalConfig, run_eval
from mbc.memory.ingest import ingest
from mbc.memory.readers import answer_from_bank, reader_for
from mbc.model import MBCModel, PointerStates
from mbc.network.pointer import TokenPointer
from mbc.network.vocabulary import CodeWriter, VocabularyCodebook, VocabularyStage
from mbc.prompts import ids_around_context
from mbc.token_memory import TokenMemory, TokenMemoryConfig
from mbc.training.activations import FrozenActivations
from mbc.training.adapters import AdapterRun
from mbc.training.naming import (
    fit_placement,
    named_tokens,
    naming_targets,
    nearest_to_labels,
    placed_tokens,
    placement_loss,
)
from mbc.training.objectives import StepObjective, amortize_some_with_grad
from mbc.training.schedule import Step
from mbc.training.token_memory import train_token_memory
from mbc.training.vocabulary_codes import kept_inputs, train_codes, written_share

KEYS = dict(retrieval_top_k=1, retrieval_subspaces=4, retrieval_codes=4)
PLACED = dict(codebook="vocabulary", code_pointer=True, pointer_layer=1, pointer_placement=True)  # on layer 1 of 2


@pytest.fixture(scope="module")
def rows():
    return generate_examples(8, seed=3)


def _fitted(tiny_paths, rows, codes: str) -> TokenMemory:
    torch.manual_seed(0)
    config = TokenMemoryConfig(keep=12, layer=2, codes=codes, base=tiny_config(tiny_paths, **KEYS).to_dict())
    return train_token_memory(rows, config, before=1, steps=50)


@pytest.fixture(scope="module")
def trained(tiny_paths, rows):
    model = _fitted(tiny_paths, rows, "written")
    kept = kept_inputs(model, documents(rows))
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_codes(model, rows[:8], 40, AdapterRun(learning_rate=2e-2, writer_learning_rate=2e-2), kept)
    return model, kept, untrained, losses


def test_the_codebook_finds_the_nearest_token_and_passes_gradients_straight_through():
    table = nn.Embedding(5, 3)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1.0]]))
    codebook = VocabularyCodebook(table, beta=0.5, chunk=2)
    vectors = torch.tensor([[0.9, 0.1, 0.0], [0.1, 1.6, 0.2], [0.8, 0.9, 1.2]], requires_grad=True)
    quantized = codebook(vectors)
    assert quantized.ids.tolist() == [1, 2, 4]
    chosen = table.weight[[1, 2, 4]].detach()
    assert torch.allclose(quantized.embeddings.detach(), chosen)
    (quantized.embeddings.sum() + quantized.commitment).backward()
    # straight through: d(sum)/d(vector) = 1, plus the commitment's beta x 2 (vector - code) / 9
    assert torch.allclose(vectors.grad, 1 + 0.5 * 2 * (vectors.detach() - chosen) / 9)
    assert table.weight.grad is None  # the LLM's token table is read, never trained


def test_an_untrained_writer_names_the_kept_tokens_themselves(tiny_paths, rows):
    kept = _fitted(tiny_paths, rows, "kept")
    written = _fitted(tiny_paths, rows, "written")  # the same seed: the same scorer
    texts = documents(rows)
    assert np.array_equal(written.compress(texts), kept.compress(texts))
    writer = CodeWriter(4, 3)
    assert torch.equal(writer(torch.ones(2, 3), torch.randn(2, 4)), torch.ones(2, 3))


def test_training_moves_the_writer_and_the_kv_lora_lowers_the_loss_and_moves_codes(trained):
    model, kept, untrained, losses = trained
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, untrained[k])}
    assert "writer.rewrite.weight" in moved and any(".lora_B." in k for k in moved)
    assert all(k.startswith("writer.") or ".lora_" in k for k in moved)  # scorer, keys and LLM as they were
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.1  # ~5.53 -> ~5.39 nats on the tiny LLM
    share = written_share(model, kept)
    assert 0 < share["moved"] <= 1 and 0 <= share["not_in_document"] <= share["moved"]


def test_written_codes_are_saved_read_back_and_refused_by_another_writers_bank(trained, rows, tmp_path):
    model, _, _, _ = trained
    model.save_pretrained(tmp_path / "written")
    loaded = TokenMemory.from_pretrained(tmp_path / "written")
    assert loaded.config.codes == "written" and loaded.config.trained_reader
    texts = documents(rows)
    assert np.array_equal(loaded.compress(texts), model.compress(texts))
    with MemoryBank.open(tmp_path / "bank.db", BankLayout.of(model)) as bank:
        ingest(model, bank, texts)
    other = TokenMemory(model.config, model.llm, model.retrieval_keys)  # the same scorer and keys, an untrained writer
    other.scorer = model.scorer
    with pytest.raises(MBCError):
        MemoryBank.open(tmp_path / "bank.db", BankLayout.of(other))


def test_eval_reads_written_codes_by_id_beside_their_unrelated_control(trained, rows, tmp_path):
    model, _, _, _ = trained
    unrelated = documents(generate_examples(8, seed=4))
    config = EvalConfig(batch_size=8, methods=["tokens", "tokens, unrelated bank"])
    summary = run_eval(None, rows[:30], unrelated, tmp_path, config, tokens=model)
    assert set(summary["methods"]) == {"tokens", "tokens, unrelated bank"}
    codes = model.codec.decode(model.compress(documents(rows)[:1]))[0]
    before, after = model.prompt_around(rows[0].question)
    assert model.prompt_ids(codes, rows[0].question) == before + codes + after


def test_written_codes_need_a_writer_and_a_valid_setting(tiny_paths, rows):
    with pytest.raises(MBCError, match="codes must be one of"):
        TokenMemoryConfig(codes="learned", base=tiny_config(tiny_paths, **KEYS).to_dict())
    kept = _fitted(tiny_paths, rows, "kept")
    with pytest.raises(MBCError, match="codes='written'"):
        train_codes(kept, rows[:8], steps=1)
    assert replace(kept.config, codes="written").codes == "written"


# ---- MBC with the vocabulary as its codebook (MBCConfig.codebook="vocabulary") ---------------------


def test_the_vocabulary_stage_looks_tokens_up_standardized_and_trains_nothing():
    torch.manual_seed(0)
    table = nn.Embedding(50, 6)
    with torch.no_grad():
        table.weight.mul_(0.05).add_(0.3)  # an LLM's scale and offset, far from the vectors' ~1
    stage = VocabularyStage(table, beta=0.5, chunk=7).train()
    centred = table.weight.detach() - table.weight.detach().mean(0)
    standardized = centred / centred.pow(2).mean().sqrt()
    vectors = (standardized[[3, 17, 42, 17]] + 0.01 * torch.randn(4, 6)).requires_grad_()
    out = stage(vectors)
    assert out.indices[..., 0].tolist() == [3, 17, 42, 17]
    assert torch.allclose(stage.decode(out.indices[..., 0]), standardized[[3, 17, 42, 17]], atol=1e-6)
    assert list(stage.parameters()) == [] and stage.state_dict() == {}  # the table is the LLM's
    (out.quantized.sum() + out.loss).backward()
    assert table.weight.grad is None
    codes = standardized[[3, 17, 42, 17]]
    assert torch.allclose(vectors.grad, 1 + 0.5 * 2 * (vectors.detach() - codes) / vectors.numel(), atol=1e-5)
    assert stage.fraction_alive() == 0.75  # three distinct tokens among four vectors
    by_direction = VocabularyStage(table, metric="cosine")
    scaled = standardized * 40  # far from every row, in the same directions
    assert by_direction.nearest(scaled[[3, 17, 42]]).tolist() == [3, 17, 42]
    assert torch.allclose(by_direction.decode(torch.tensor([3])).norm(), torch.tensor(6**0.5))


def test_mbc_with_vocabulary_codes_stores_token_ids_and_reads_them_through_its_prefix(tiny_model, tmp_path):
    model = tiny_model(codebook="vocabulary", codebook_stages=2).eval()
    vocabulary = model.llm.model.get_input_embeddings().num_embeddings
    entries = model.compress(DOCUMENTS)
    assert entries.shape == (3, 4, 2) and entries[..., 0].max() < vocabulary
    assert model.bank_layout().codebook_size == vocabulary  # every index holds a token id
    sizes = model.bytes_per_document()
    assert sizes["mbc"] == (4 * 2 * int(np.ceil(np.log2(vocabulary))) + 7) // 8
    assert sizes["codebook_total"] == 16 * model.llm.layout.hidden_size * 4  # the learned residual stage only
    tokens = model.quantizer.stages[0].decode(torch.as_tensor(entries[..., 0]))
    residual = model.quantizer.stages[1].decode(torch.as_tensor(entries[..., 1]))
    assert torch.allclose(model.memory(entries), (tokens + residual).reshape(-1, tokens.shape[-1]), atol=1e-6)
    model.train()
    out = model(DOCUMENTS[:2], QUESTIONS, ANSWERS)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.vq_loss > 0
    assert all(p.grad is not None for p in model.amortization.slot_mlp.parameters())
    assert model.llm.model.get_input_embeddings().weight.grad is None
    model.eval().save_pretrained(tmp_path / "vocab")
    entries = model.compress(DOCUMENTS)  # training moved the slot statistics and revived residual codes
    again = type(model).from_pretrained(tmp_path / "vocab").eval()
    assert np.array_equal(again.compress(DOCUMENTS), entries)
    assert again.codebook_fingerprint() == model.codebook_fingerprint()
    bank = MemoryBank.open(tmp_path / "bank.sqlite", BankLayout.of(again))
    ingest(again, bank, DOCUMENTS)
    assert np.array_equal(bank.entries(bank.ids()), entries)
    assert len(answer_from_bank(again, reader_for(again, bank), QUESTIONS)) == 2


def test_vocabulary_codes_refuse_a_float_memory():
    with pytest.raises(MBCError, match="quantize=True"):
        MBCConfig(codebook="vocabulary", quantize=False)


def test_naming_targets_are_each_documents_answer_tokens_in_order(tiny_model):
    tokenizer = tiny_model(codebook="vocabulary").llm.tokenizer
    rows = [
        QAExample("Ann met Bo in Rome.", "Who met Bo?", ("Ann",), "g"),
        QAExample("Ann met Bo in Rome.", "Where?", ("Rome",), "g"),
    ]
    targets = naming_targets(tokenizer, rows, num_slots=6, before=1)
    text = "Ann met Bo in Rome."
    expected = (
        tokenizer("Ann", add_special_tokens=False)["input_ids"]
        + tokenizer(" Rome", add_special_tokens=False)["input_ids"]
    )
    assert targets == {text: expected[:6]}


def test_filled_naming_targets_add_the_tokens_nearest_to_the_answers_in_document_order(tiny_model):
    assert nearest_to_labels([0, 0, 1, 0, 0, 0, 1, 0], 5) == [1, 2, 3, 5, 6]
    assert nearest_to_labels([0, 0, 0], 2) == [0, 1]  # no answer in it: the first tokens
    assert nearest_to_labels([1, 0], 5) == [0, 1]  # a short document: all of it, the rest free
    tokenizer = tiny_model(codebook="vocabulary").llm.tokenizer
    text = "Ann met Bo in Rome."
    rows = [QAExample(text, "Who met Bo?", ("Ann",), "g")]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert naming_targets(tokenizer, rows, num_slots=len(ids) + 3, before=0, fill=True) == {text: ids}
    plain = naming_targets(tokenizer, rows, num_slots=len(ids), before=0)[text]
    assert plain == tokenizer("Ann", add_special_tokens=False)["input_ids"] and len(plain) < len(ids)


def test_naming_steps_teach_the_slots_to_store_the_answer_tokens(tiny_model):
    model = tiny_model(codebook="vocabulary", codebook_metric="cosine").train()
    rows = generate_examples(8, seed=5)  # SlotNorm standardizes across the batch's documents: more than two
    targets = naming_targets(model.llm.tokenizer, rows, model.config.num_slots)
    texts = list(targets)
    objective = StepObjective(model, naming_targets=targets)
    step = Step(objective="probe", naming_weight=1.0, naming_temperature=0.05)
    losses = []
    out = _train(model, objective, rows, texts, step, 60, losses)
    assert float(out.naming_loss.detach()) < losses[0] / 4
    stored = model.eval().compress(texts)[..., 0]
    named = [
        sum(a == b for a, b in zip(row, targets[text])) / len(targets[text])
        for row, text in zip(stored.tolist(), texts)
    ]
    assert np.mean(named) >= 0.75  # most slots are stored as the very token they were taught to name (0.94 here)


def test_naming_steps_need_vocabulary_codes(tiny_paths, tmp_path):
    from mbc.training.trainer import TrainConfig, train

    rows = generate_examples(4, seed=1)
    with pytest.raises(MBCError, match="codebook=vocabulary"):
        train(
            tiny_config(tiny_paths),
            TrainConfig(output_dir=str(tmp_path), batch_size=2, max_steps=2, naming_steps=1),
            rows,
            rows,
        )


def test_input_reading_trains_the_codes_through_the_llms_input_and_answers_from_them(tiny_model, tmp_path):
    model = tiny_model(codebook="vocabulary", codebook_metric="cosine", code_reading="input", **KEYS).train()
    model.retrieval_keys.fit(DOCUMENTS + MORE_DOCUMENTS)
    out = model(DOCUMENTS[:2], QUESTIONS, ANSWERS, question_documents=[0, 1])
    out.loss.backward()
    assert torch.isfinite(out.qa_loss) and out.vq_loss > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.amortization.slot_mlp.parameters())
    assert model.llm.model.get_input_embeddings().weight.grad is None
    model.eval()
    stage = model.quantizer.stages[0]
    ids = torch.as_tensor(model.compress(DOCUMENTS)[..., 0]).long()
    embedded = stage.to_embeddings(stage.decode(ids), ids)
    assert torch.allclose(embedded, model.llm.model.get_input_embeddings()(ids), atol=1e-5)
    bank = MemoryBank.open(tmp_path / "bank.sqlite", BankLayout.of(model))
    ingest(model, bank, DOCUMENTS)
    reader = reader_for(model, bank)
    prompts, read = model.code_prompts(reader, QUESTIONS)
    stored = bank.entries([ids[0] for ids in read])[..., 0].tolist()
    before, _ = ids_around_context(model.llm.tokenizer, QUESTIONS[0])
    assert [
        p[len(before) : len(before) + len(s)] for p, s in zip(prompts, stored)
    ] == stored  # as the tokens themselves
    answers, loss, _ = model.answer_and_loss(reader, QUESTIONS, ANSWERS)
    assert answers == model.llm.generate(prompts) and torch.isfinite(loss)
    with pytest.raises(MBCError, match="through a reader"):
        model.answer(QUESTIONS, model.memory(model.compress(DOCUMENTS)))


def test_input_reading_of_the_top_two_documents_puts_both_entries_before_the_question(tiny_model, tmp_path):
    model = tiny_model(codebook="vocabulary", codebook_metric="cosine", code_reading="input", **KEYS).eval()
    model.retrieval_keys.fit(DOCUMENTS + MORE_DOCUMENTS)
    bank = MemoryBank.open(tmp_path / "bank.sqlite", BankLayout.of(model))
    ingest(model, bank, DOCUMENTS)
    model.config = replace(model.config, retrieval_top_k=2)  # a read-time setting (mbc eval --mbc-retrieval)
    prompts, read = model.code_prompts(reader_for(model, bank), QUESTIONS)
    before, after = ids_around_context(model.llm.tokenizer, QUESTIONS[0])
    first, second = bank.entries(read[0])[..., 0].tolist()
    assert len(read[0]) == 2 and prompts[0] == before + first + second + after


def test_training_to_read_the_top_two_puts_the_best_keyed_other_document_beside_its_own_in_key_order(
    tiny_model, monkeypatch
):
    model = tiny_model(codebook="vocabulary", codebook_metric="cosine", code_reading="input", **KEYS).train()
    model.retrieval_keys.fit(DOCUMENTS + MORE_DOCUMENTS)
    model.config = replace(model.config, retrieval_top_k=2)
    own = [0, 1]
    reads = model._training_reads(QUESTIONS, DOCUMENTS, own, ranked=True)
    scores = model.retrieval_keys.scores(QUESTIONS, model.retrieval_keys.keys_of(DOCUMENTS))
    assert all(d in row for d, row in zip(own, reads.tolist())) and reads.shape == (2, 2)
    assert (scores.gather(1, reads).diff(dim=1) <= 0).all()  # best first, wherever its own ranks
    memory = model.codec.training_memory(model.amortize(DOCUMENTS))
    codes = model.quantizer.stages[0].to_embeddings(memory.vectors, memory.indices[..., 0])
    seen = []
    monkeypatch.setattr(model.llm, "loss_around", lambda read, *rest: seen.extend(read) or torch.zeros(()))
    model.input_reading_loss(QUESTIONS, ANSWERS, memory, own, documents=DOCUMENTS)
    assert [torch.equal(r, torch.cat([codes[d] for d in row])) for r, row in zip(seen, reads.tolist())] == [True] * 2
    seen.clear()
    model.input_reading_loss(QUESTIONS, ANSWERS, memory, own)  # no batch documents: its own alone
    assert [torch.equal(r, codes[d]) for r, d in zip(seen, own)] == [True] * 2


def test_training_can_start_from_a_trained_adapters_weights_and_keeps_its_fitted_parts(
    tiny_paths, tmp_path, monkeypatch
):
    from mbc.training.trainer import TrainConfig, train

    config = tiny_config(
        tiny_paths, **PLACED, codebook_metric="cosine", code_reading="input", code_entry_bytes=6, **KEYS
    )
    rows = generate_examples(4, seed=1)
    steps = dict(naming_steps=1, naming_fill=True, probe_steps=0, probe_weight=0.0, eval_questions=0, batch_size=2)
    train(config, TrainConfig(output_dir=str(tmp_path / "a"), max_steps=1, **steps), rows, rows)
    trained = MBCModel.from_pretrained(tmp_path / "a" / "last")
    with torch.no_grad():  # a salience that fitting the placement again would not give
        trained.pointer.salience.weight.add_(torch.randn_like(trained.pointer.salience.weight))
    trained.save_pretrained(tmp_path / "a2")
    started = {}

    def record(self, *args, **kwargs):  # the weights as the second run's first step finds them
        if not started:
            started.update({k: v.clone() for k, v in self.model.trainable_state_dict().items()})
        return original(self, *args, **kwargs)

    original = StepObjective.forward
    monkeypatch.setattr(StepObjective, "forward", record)
    train(
        replace(config, retrieval_top_k=2),
        TrainConfig(output_dir=str(tmp_path / "b"), max_steps=1, **steps),
        rows,
        rows,
        init_from=tmp_path / "a2",
        trained_on="again",
    )
    expected = trained.trainable_state_dict()
    assert set(started) == set(expected) and all(torch.equal(started[k], expected[k]) for k in expected)
    assert MBCModel.from_pretrained(tmp_path / "b" / "last").trained_on == "again"
    other = replace(config, num_slots=config.num_slots + 1)
    with pytest.raises(MBCError, match="cannot start from the weights in"):
        train(
            other,
            TrainConfig(output_dir=str(tmp_path / "c"), max_steps=1, **steps),
            rows,
            rows,
            init_from=tmp_path / "a" / "last",
        )


def test_input_reading_needs_vocabulary_codes_a_retrieval_key_and_no_prefix_warm_start(tiny_paths, tmp_path):
    from mbc.training.trainer import TrainConfig, train

    with pytest.raises(MBCError, match="codebook=vocabulary"):
        MBCConfig(code_reading="input", retrieval_top_k=1)
    with pytest.raises(MBCError, match="retrieval_top_k >= 1"):
        MBCConfig(code_reading="input", codebook="vocabulary")
    config = tiny_config(tiny_paths, codebook="vocabulary", code_reading="input", **KEYS)
    rows = generate_examples(4, seed=1)
    with pytest.raises(MBCError, match="probe_steps=0"):
        train(config, TrainConfig(output_dir=str(tmp_path), batch_size=2, max_steps=2, probe_steps=1), rows, rows)


def test_a_pointing_slot_stores_a_token_of_its_own_document(tiny_model):
    model = tiny_model(codebook="vocabulary", code_pointer=True, pointer_layer=1).eval()
    with torch.no_grad():
        model.pointer.query.weight.mul_(300)  # a peaked attention: each slot takes one token's code
    stored = model.compress(DOCUMENTS)[..., 0]
    for row, text in zip(stored.tolist(), DOCUMENTS):
        own = set(model.llm.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert set(row) <= own
    attention = model.pointer.attention(
        model.amortization(*model.document_tokens(DOCUMENTS)),
        *_hidden_and_mask(model, DOCUMENTS),
    )
    assert torch.allclose(attention.sum(-1), torch.ones(3, 4))


def _hidden_and_mask(model, texts):
    from mbc.network.frozen_llm import lower_hidden

    ids, mask = model._encode_text(model.llm.tokenizer, texts, model.config.max_document_tokens)
    return lower_hidden(model.llm.model, model.llm.layout, ids, mask, model.config.pointer_layer), mask


def test_naming_teaches_a_pointer_where_to_look(tiny_model):
    model = tiny_model(codebook="vocabulary", codebook_metric="cosine", code_pointer=True, pointer_layer=1).train()
    rows = generate_examples(8, seed=5)
    targets = naming_targets(model.llm.tokenizer, rows, model.config.num_slots)
    texts = list(targets)
    objective = StepObjective(model, naming_targets=targets)
    _train(model, objective, rows, texts, Step(objective="probe", naming_weight=1.0, naming_temperature=0.05), 60)
    assert model.pointer.query.weight.grad.abs().sum() > 0
    stored = model.eval().compress(texts)[..., 0]
    named = [np.mean([a == b for a, b in zip(row, targets[t])]) for row, t in zip(stored.tolist(), texts)]
    assert np.mean(named) >= 0.9  # every slot here (a generated slot: 0.94)


def test_pointer_places_start_at_nothing_and_can_point_slot_k_at_token_k(tiny_model):
    plain = tiny_model(codebook="vocabulary", code_pointer=True, pointer_layer=1).eval()
    placed = tiny_model(codebook="vocabulary", code_pointer=True, pointer_layer=1, pointer_positions=True).eval()
    slots = plain.amortization(*plain.document_tokens(DOCUMENTS))
    hidden_mask = _hidden_and_mask(plain, DOCUMENTS)
    assert torch.allclose(plain.pointer.attention(slots, *hidden_mask), placed.pointer.attention(slots, *hidden_mask))
    with torch.no_grad():  # slot k's place matches token k's and no other
        k = placed.config.num_slots
        placed.pointer.slot_places.weight.zero_()[:, :k].copy_(torch.eye(k) * 300)
        placed.pointer.token_places.weight.zero_()[:k, :k].copy_(torch.eye(k) * 300)
    pointed = placed.pointer.attention(slots, *hidden_mask).argmax(-1)
    assert pointed.tolist() == [list(range(k))] * len(DOCUMENTS)


def test_placement_lays_slot_k_on_the_kth_salient_token_in_document_order():
    mask = torch.ones(1, 10)
    even = TokenPointer.placement(torch.zeros(1, 10), mask, 5).exp()  # no salience: 2 tokens a slot
    assert torch.allclose(even.sum(-1), torch.ones(1, 5), atol=1e-2)  # each slot wholly covered
    assert even[0].argmax(0).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    salient = torch.tensor(
        [[0.1, 2.0, -0.3, 0.2, 3.5, 3.0, -0.1, 0.0, 4.0, 0.3]]
    )  # three slots: the three most salient
    prior = TokenPointer.placement(salient, mask, 3)
    assert prior.argmax(-1).tolist() == [[4, 5, 8]]
    assert (prior.exp().amax(-1) > 0.9).all()  # the K+1-th keeps a little of the last slot
    short = TokenPointer.placement(torch.zeros(1, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]]), 4)
    assert short.exp()[0, :, 2:].max() < 1e-3  # padding gets no slot; two tokens cover four slots
    assert short.argmax(-1).tolist() == [[0, 0, 1, 1]]


def test_hard_placement_gives_slot_k_exactly_the_kth_salient_token_and_passes_gradients():
    salience = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5, 2.5]], requires_grad=True)
    mask = torch.ones(1, 6)
    covered = TokenPointer.placement(salience, mask, 3, hard=True).exp()
    assert covered.argmax(-1).tolist() == [[1, 3, 5]]  # the 3 most salient, in document order
    assert torch.allclose(covered.max(-1).values, torch.ones(1, 3), atol=1e-3)  # each wholly
    (covered[0, 0, 1]).backward()
    assert salience.grad.abs().sum() > 0  # straight through, by the soft masses
    short = TokenPointer.placement(torch.zeros(1, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]]), 3, hard=True).exp()
    assert short[0, :2].argmax(-1).tolist() == [0, 1] and short[0, 2].max() < 1e-3  # ties kept; slot 3 uncovered


def test_a_copying_pointer_stores_the_most_salient_tokens_themselves(tiny_model):
    model = tiny_model(**PLACED, pointer_copy=True)
    model.eval()
    assert model.pointer.residual is None
    with torch.no_grad():
        model.pointer.salience.weight.normal_()
        states = model.pointer_states(DOCUMENTS)
        placed = torch.tensor(placed_tokens(model.pointer, states, model.config.num_slots))
        stored = torch.as_tensor(model.compress(DOCUMENTS)[..., 0]).long()
        salience = model.pointer.token_salience(states.hidden).masked_fill(states.mask == 0, float("-inf"))
    most_salient = salience.topk(model.config.num_slots, dim=1).indices.sort(dim=1).values
    assert placed.tolist() == states.ids.gather(1, most_salient).tolist()
    assert (stored == placed).float().mean() >= 0.9
    with pytest.raises(MBCError, match="pointer_placement=true"):
        MBCConfig(codebook="vocabulary", code_pointer=True, pointer_copy=True)


def test_a_copying_pointer_keeps_a_short_documents_uncovered_slots_out_of_its_entry_and_its_reading(tiny_model):
    model = tiny_model(
        **PLACED, code_reading="input", pointer_copy=True, code_entry_bytes=64, num_slots=12, **KEYS
    ).eval()
    model.retrieval_keys.fit(DOCUMENTS + MORE_DOCUMENTS)
    model.fit_code(DOCUMENTS + MORE_DOCUMENTS)
    texts = ["Mira.", DOCUMENTS[0]]
    ids = model.llm_token_ids(texts)
    assert len(ids[0]) < 12 <= len(ids[1])
    assert model.filled_slots(model.pointer_states(texts)) == [len(ids[0]), 12]
    assert model.codec.token_ids(model.compress(texts))[0] == ids[0]  # each token once, in order, no more
    out = StepObjective(model)(texts, QUESTIONS, ANSWERS, [0, 1], Step())
    assert torch.isfinite(out.qa_loss)


def test_the_placement_loss_fits_the_salience_to_the_named_places():
    torch.manual_seed(0)
    pointer = TokenPointer(dim=4, hidden_dim=8, placement=True)
    hidden, mask = torch.randn(2, 12, 8), torch.ones(2, 12)
    places = [[2, 3, 7], [0, 5, 11]]
    for row, kept in enumerate(places):
        hidden[row, kept, 0] += 3.0  # what the LLM's hidden states say of a token worth a slot
    optimizer = torch.optim.Adam(pointer.salience.parameters(), lr=0.1)
    for _ in range(100):
        loss = placement_loss(pointer, hidden, mask, places)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pointed = pointer.placement(pointer.token_salience(hidden), mask, 3).argmax(-1)
    assert pointed.tolist() == places


def test_fit_placement_starts_the_salience_on_the_named_places():
    torch.manual_seed(0)
    pointer = TokenPointer(dim=4, hidden_dim=8, placement=True)
    hidden, mask = torch.randn(2, 12, 8), torch.ones(2, 12)
    places = {"a": [2, 3, 7], "b": [0, 5, 11]}
    for row, kept in enumerate(places.values()):
        hidden[row, kept, 0] += 8.0
    rows = {"a": 0, "b": 1}

    def states(texts):
        chosen = [rows[t] for t in texts]
        return PointerStates(torch.zeros(len(chosen), 12, dtype=torch.long), mask[chosen], hidden[chosen])

    fit_placement(pointer, states, places, batch_size=1)
    pointed = pointer.placement(pointer.token_salience(hidden), mask, 3).argmax(-1)
    assert pointed.tolist() == list(places.values())
    ids = torch.arange(24).reshape(2, 12)  # what each slot names: the token it is placed on
    assert placed_tokens(pointer, PointerStates(ids, mask, hidden), 3) == [[2, 3, 7], [12, 17, 23]]


def test_training_with_placement_fits_the_salience_and_the_prefix_code_before_the_first_step(tiny_paths, tmp_path):
    from mbc.training.trainer import TrainConfig, train

    config = tiny_config(
        tiny_paths, **PLACED, codebook_metric="cosine", code_reading="input", code_entry_bytes=6, **KEYS
    )
    rows = generate_examples(4, seed=1)
    steps = dict(naming_only_steps=1, naming_steps=2, naming_fill=True, probe_steps=0, probe_weight=0.0)
    train(
        config, TrainConfig(output_dir=str(tmp_path), batch_size=2, max_steps=2, eval_questions=0, **steps), rows, rows
    )
    model = MBCModel.from_pretrained(tmp_path / "last")
    assert model.pointer.salience.weight.abs().sum() > 0
    assert model.prefix_code.fitted and model.compress(DOCUMENTS).shape == (3, 6, 1)  # saved with the adapter


def test_placed_slots_store_the_most_salient_tokens_in_document_order(tiny_model):
    model = tiny_model(
        **PLACED,
        codebook_metric="cosine",
        lora_layers=1,
        prefix_layers=1,  # nothing adapted below the pointer's layer: its hidden states can be kept
    ).train()
    rows = generate_examples(8, seed=5)
    named = named_tokens(model.llm.tokenizer, rows, model.config.num_slots, fill=True)
    texts = list(named)
    objective = StepObjective(
        model,
        FrozenActivations(model),
        {t: ids for t, (ids, _) in named.items()},
        {t: places for t, (_, places) in named.items()},
    )
    assert objective.frozen.pointer is not None  # the pointer's hidden states kept, as the trainer does
    _train(model, objective, rows, texts, Step(objective="name", naming_weight=1.0), 10)
    assert model.pointer.salience.weight.abs().sum() > 0  # naming trains the salience (fitted: the tests above)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(objective.frozen.amortize(texts), model.amortize(texts), atol=1e-5)
        states = model.pointer_states(texts)
        salience = model.pointer.token_salience(states.hidden).masked_fill(states.mask == 0, float("-inf"))
    placed = torch.tensor(placed_tokens(model.pointer, states, model.config.num_slots))
    stored = torch.as_tensor(model.compress(texts)[..., 0]).long()
    # most slots store the token they are placed on (random tokens: ~1%); not all, as the tiny
    # model's saliences lie close together, so its placement is soft and the content term decides
    assert (stored == placed).float().mean() >= 0.5
    most_salient = salience.topk(model.config.num_slots, dim=1).indices.sort(dim=1).values
    assert (placed == states.ids.gather(1, most_salient)).float().mean() >= 0.5


def test_a_step_makes_the_pointer_states_once_and_splits_them_with_the_documents(tiny_model):
    model = tiny_model(**PLACED, codebook_metric="cosine").eval()
    rows = generate_examples(6, seed=5)
    named = named_tokens(model.llm.tokenizer, rows, model.config.num_slots, fill=True)
    texts = list(named)
    made = []
    make_states = model.pointer_states
    model.pointer_states = lambda documents, lower=None: made.append(len(documents)) or make_states(documents, lower)
    objective = StepObjective(
        model, None, {t: ids for t, (ids, _) in named.items()}, {t: places for t, (_, places) in named.items()}
    )
    step = Step(objective="name", naming_weight=1.0, backprop_keep=0.34)  # 2 documents with gradients, 4 without
    objective(texts, [r.question for r in rows], [r.answers[0] for r in rows], [0] * len(rows), step)
    assert made == [len(texts)]  # once for the pointer and the placement's naming, not once for each
    split = amortize_some_with_grad(model.amortize, texts, 0.34, make_states(texts))
    assert torch.allclose(split, model.amortize(texts), atol=1e-5)


def test_a_pointer_needs_vocabulary_codes_and_a_layer_the_llm_has(tiny_paths):
    with pytest.raises(MBCError, match="codebook=vocabulary"):
        MBCConfig(code_pointer=True)
    with pytest.raises(MBCError, match="need code_pointer=true"):
        MBCConfig(codebook="vocabulary", pointer_positions=True)
    with pytest.raises(MBCError, match="need code_pointer=true"):
        MBCConfig(codebook="vocabulary", pointer_placement=True)
    with pytest.raises(MBCError, match="pointer_layer=9"):
        MBCModel.build(tiny_config(tiny_paths, codebook="vocabulary", code_pointer=True, pointer_layer=9))


def test_lexical_weight_finds_the_document_whose_stored_tokens_share_the_questions(tiny_model, tmp_path):
    model = tiny_model(codebook="vocabulary", codebook_metric="cosine", lexical_weight=100.0, **KEYS).eval()
    model.retrieval_keys.fit(DOCUMENTS + MORE_DOCUMENTS)
    bank = MemoryBank.open(tmp_path / "bank.sqlite", BankLayout.of(model))
    ids = ingest(model, bank, DOCUMENTS).ids
    kept = model.stored_keys(bank, ids)
    subspaces = model.config.retrieval_subspaces
    assert kept.shape == (3, subspaces + model.config.num_slots)
    assert kept[:, subspaces:].tolist() == bank.entries(ids)[..., 0].tolist()  # the codes as a lexical index
    # Whatever the keys say, a question whose tokens only the second document's codes hold reads it.
    question = "Where is Quelmont?"
    asked = model.llm.tokenizer([question], add_special_tokens=False)["input_ids"][0]
    other = next(i for i in range(1, 1000) if i not in asked)
    tokens = torch.full_like(kept[:, subspaces:], other)
    tokens[1] = torch.tensor(asked[: tokens.shape[1]])
    assert model.top_documents([question], torch.cat([kept[:, :subspaces], tokens], 1)).tolist() == [[1]]


def test_prefix_coded_codes_store_the_longest_head_that_fits_and_are_read_as_those_tokens(tiny_model, tmp_path):
    with pytest.raises(MBCError, match="code_reading=input"):
        MBCConfig(codebook="vocabulary", code_entry_bytes=8)
    budget = 3  # 24 bits: fewer than the 4 codes of this tiny model's random slots
    model = tiny_model(
        codebook="vocabulary", code_reading="input", code_entry_bytes=budget, lexical_weight=1.0, **KEYS
    ).eval()
    model.retrieval_keys.fit(DOCUMENTS + MORE_DOCUMENTS)
    with pytest.raises(MBCError, match="not fitted"):
        model.compress(DOCUMENTS)
    model.fit_code(DOCUMENTS + MORE_DOCUMENTS)
    entries = model.compress(DOCUMENTS)
    assert entries.shape == (3, budget, 1) and entries.dtype == np.uint8
    assert model.bytes_per_document()["mbc"] == budget == BankLayout.of(model).entry_bytes
    codebook = model.codec.codebook
    uncoded = codebook.token_ids(codebook.encode(model.amortize(DOCUMENTS)))
    stored = model.codec.token_ids(entries)
    assert stored == [model.prefix_code.coder().longest_head(row, budget) for row in uncoded]
    assert any(len(row) < model.config.num_slots for row in stored)
    bank = MemoryBank.open(tmp_path / "bank.sqlite", BankLayout.of(model))
    ids = ingest(model, bank, DOCUMENTS).ids
    kept = model.stored_keys(bank, ids)[:, model.config.retrieval_subspaces :]
    assert [[t for t in row if t >= 0] for row in kept.tolist()] == stored  # the lexical index, padded
    prompts, read = model.code_prompts(reader_for(model, bank), QUESTIONS)
    before, _ = ids_around_context(model.llm.tokenizer, QUESTIONS[0])
    for prompt, document in zip(prompts, read):
        own = stored[ids.index(document[0])]
        assert prompt[len(before) : len(before) + len(own)] == own
    with pytest.raises(MBCError, match="read as tokens"):
        model.memory(entries)


def test_an_index_of_rare_tokens_follows_the_codes_for_bm25_and_the_reader_reads_the_codes_alone(tiny_model, tmp_path):
    with pytest.raises(MBCError, match="index_entry_bytes"):
        MBCConfig(codebook="vocabulary", code_reading="input", code_entry_bytes=8, index_entry_bytes=8, **KEYS)
    settings = dict(**PLACED, code_reading="input", pointer_copy=True, code_entry_bytes=4, lexical_weight=1.0)
    models = [tiny_model(**settings, index_entry_bytes=index, **KEYS).eval() for index in (0, 6)]
    for model in models:
        model.retrieval_keys.fit(DOCUMENTS + MORE_DOCUMENTS)
        model.fit_code(DOCUMENTS + MORE_DOCUMENTS)
    plain, indexed = models
    entries = indexed.compress(DOCUMENTS)
    assert (
        entries.shape == (3, 10, 1) and indexed.bytes_per_document()["mbc"] == 10 == BankLayout.of(indexed).entry_bytes
    )
    codes = indexed.codec.token_ids(entries)
    assert codes == plain.codec.token_ids(plain.compress(DOCUMENTS))  # the same codes, the index after them
    coder = indexed.prefix_code.coder()
    for document, held, both in zip(indexed.llm_token_ids(DOCUMENTS), codes, indexed.codec.lexical_ids(entries)):
        index = both[len(held) :]
        assert both[: len(held)] == held and index and not set(index) & set(held) and set(index) <= set(document)
        assert [coder.lengths[t] for t in index] == sorted((coder.lengths[t] for t in index), reverse=True)
        assert coder.bits(index) <= 8 * 6
    bank = MemoryBank.open(tmp_path / "bank.sqlite", BankLayout.of(indexed))
    ids = ingest(indexed, bank, DOCUMENTS).ids
    rows = indexed.stored_keys(bank, ids)[:, indexed.config.retrieval_subspaces :]
    assert [[t for t in row if t >= 0] for row in rows.tolist()] == indexed.codec.lexical_ids(entries)
    prompts, read = indexed.code_prompts(reader_for(indexed, bank), QUESTIONS)
    before, after = ids_around_context(indexed.llm.tokenizer, QUESTIONS[0])
    assert prompts[0] == before + codes[ids.index(read[0][0])] + after  # the reader never reads the index


def test_held_input_reading_trains_the_reader_alone_and_the_schedule_holds_after_naming(tiny_model):
    from mbc.training.schedule import Schedule
    from mbc.training.trainer import TrainConfig

    # vq_weight 0: the commitment term, which still trains the writer while the reading is held, left out
    model = tiny_model(codebook="vocabulary", code_reading="input", vq_weight=0.0, **KEYS).train()
    model.retrieval_keys.fit(DOCUMENTS + MORE_DOCUMENTS)
    with torch.no_grad():  # a KV-LoRA that is not zero, so that its both halves have a gradient to show
        for name, parameter in model.named_parameters():
            if "lora" in name:
                parameter.normal_(0, 0.1)
    out = StepObjective(model)(DOCUMENTS[:2], QUESTIONS, ANSWERS, [0, 1], Step(hold_reading=True))
    out.loss.backward()
    writer = list(model.amortization.slot_mlp.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in writer)  # in the graph, no QA gradient
    lora = [p for name, p in model.named_parameters() if "lora" in name and p.requires_grad]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    config = TrainConfig(naming_only_steps=2, naming_steps=2, hold_reading_steps=3)
    steps = [Schedule(config, total_steps=8, quantize=True).at(step, 2, False) for step in range(8)]
    assert [s.objective for s in steps] == ["name"] * 2 + ["qa"] * 6
    assert [s.hold_reading for s in steps] == [False] * 2 + [True] * 3 + [False] * 3


def _train(model, objective, rows, texts, step, steps: int, naming_losses: list | None = None):
    """``steps`` Adam steps of ``objective`` on ``rows`` (documents ``texts``); the last output.
    ``naming_losses`` gets each step's naming loss."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    own = [texts.index(r.document) for r in rows]
    for _ in range(steps):
        out = objective(texts, [r.question for r in rows], [r.answers[0] for r in rows], own, step)
        if naming_losses is not None:
            naming_losses.append(float(out.naming_loss.detach()))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return out

import pytest
import torch
from conftest import ANSWERS, DOCUMENTS, QUESTIONS

from mbc import MBCError
from mbc.training.objectives import (
    READING_PATH,
    StepObjective,
    amortize_some_with_grad,
    answer_probe_logits,
    answer_probe_loss,
    bank_mask,
    with_answer_hint,
)
from mbc.training.schedule import Schedule, Step
from mbc.training.trainer import TrainConfig


def test_default_step_is_the_models_own_loss(tiny_model):
    model = tiny_model().eval()  # eval: no dropout or code resets, so the two passes compute the same
    torch.manual_seed(0)
    expected = model(DOCUMENTS, QUESTIONS, ANSWERS)
    torch.manual_seed(0)
    out = StepObjective(model)(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1], Step())
    assert torch.equal(out.loss, expected.loss) and torch.equal(out.vq_loss, expected.vq_loss) and out.probe_loss == 0


def test_float_memory_step_reads_the_vectors_and_keeps_the_codebook_in_the_graph(tiny_model):
    model = tiny_model().eval()
    out = StepObjective(model)(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1], Step(float_memory=True))
    assert out.vq_loss == 0 and out.loss == out.qa_loss
    out.loss.backward()
    assert model.quantizer.stages[0].codebook.grad is not None  # in the graph (DDP), with a zero gradient
    assert model.quantizer.stages[0].codebook.grad.abs().sum() == 0


def test_probe_objective_trains_the_reading_path_and_keeps_the_llm_side_in_the_graph(tiny_model):
    model = tiny_model().train()
    out = StepObjective(model)(DOCUMENTS[:2], QUESTIONS, ANSWERS, [0, 1], Step("probe"))
    assert out.qa_loss == 0 and out.probe_loss > 0
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.amortization.slot_mlp.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aggregator.parameters() if p.requires_grad)
    lora = [p for name, p in model.llm.model.named_parameters() if p.requires_grad]
    assert lora and all(p.grad is not None and p.grad.abs().sum() == 0 for p in lora)  # in the graph (DDP), not moved
    first = torch.tensor([model.llm.answer_ids(a)[0] for a in ANSWERS])
    modulation = model.modulation(QUESTIONS, model.memory(model.compress(DOCUMENTS[:2])))
    expected = torch.nn.functional.cross_entropy(answer_probe_logits(model, modulation), first)
    assert torch.allclose(answer_probe_loss(model, modulation, ANSWERS), expected)
    with pytest.raises(MBCError, match="objective"):
        StepObjective(model)(DOCUMENTS[:2], QUESTIONS, ANSWERS, [0, 1], Step("probes"))


def test_probe_over_all_tokens_asks_vector_k_for_answer_token_k(tiny_model):
    model = tiny_model().eval()
    modulation = torch.randn(2, model.config.num_slots, model.llm.layout.hidden_size)
    answers = ["a b c d e f g h i j k l m n o", "x"]  # longer than K, and one token
    logits = answer_probe_logits(model, modulation, "all")
    assert logits.shape == (2, model.config.num_slots, model.llm.model.config.vocab_size)
    targets = [model.llm.answer_ids(a)[:-1][: model.config.num_slots] for a in answers]  # without EOS, at most K
    assert len(targets[0]) == model.config.num_slots and len(targets[1]) < model.config.num_slots
    terms = [
        torch.nn.functional.cross_entropy(logits[i, k], torch.tensor(t))
        for i, ids in enumerate(targets)
        for k, t in enumerate(ids)
    ]
    assert torch.allclose(answer_probe_loss(model, modulation, answers, "all"), torch.stack(terms).mean(), atol=1e-5)
    with pytest.raises(MBCError, match="probe tokens"):
        answer_probe_logits(model, modulation, "last")


def test_bank_size_one_lets_each_question_see_only_its_own_document(tiny_model):
    model = tiny_model().eval()
    memory = model.memory(model.compress(DOCUMENTS))  # 3 documents x 4 slots
    mask = bank_mask([2, 0], num_documents=3, bank_size=1, num_slots=4)
    assert mask.tolist() == [[False] * 8 + [True] * 4, [True] * 4 + [False] * 8]
    masked = model.modulation(QUESTIONS, memory, memory_mask=mask)
    alone = [model.modulation([q], memory[4 * d : 4 * d + 4]) for q, d in zip(QUESTIONS, [2, 0])]
    assert torch.allclose(masked, torch.cat(alone), atol=1e-5)
    assert bank_mask([1, 1], 3, 2, 4).sum(dim=1).tolist() == [8, 8]


def test_backprop_dropout_keeps_document_order(tiny_model):
    model = tiny_model().eval()  # eval: no dropout, so both paths compute the same vectors
    split = amortize_some_with_grad(model.amortize, DOCUMENTS, 0.34)  # one document with gradients, two without
    assert split.requires_grad
    assert torch.allclose(split, model.amortize(DOCUMENTS), atol=1e-5)


@pytest.mark.parametrize("objective", ["qa", "probe"])
def test_reading_gap_is_the_loss_with_the_next_document_minus_with_its_own(tiny_model, objective):
    model = tiny_model(retrieval_top_k=1, retrieval_subspaces=4, retrieval_codes=3).eval()  # eval: deterministic
    model.retrieval_keys.fit(DOCUMENTS)
    with torch.no_grad():  # an untrained prefix starts at zero, which no memory would change
        for parameter in model.prefix_expansion.parameters():
            parameter.normal_(0, 0.5)
    objective_of = StepObjective(model)
    # float memory: an untrained codebook gives every document the same code
    measured = objective_of(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1], Step(objective, True, measure_gap=True))
    own = objective_of(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1], Step(objective, True))
    swapped = objective_of(DOCUMENTS, QUESTIONS, ANSWERS, [1, 2], Step(objective, True))
    assert torch.equal(measured.loss, own.loss)  # measuring changes nothing that trains
    assert not measured.reading_gap.requires_grad and own.reading_gap == 0
    loss = "probe_loss" if objective == "probe" else "qa_loss"
    expected = getattr(swapped, loss) - getattr(own, loss)
    assert expected.abs() > 1e-4 and torch.allclose(measured.reading_gap, expected, atol=1e-5)


def test_measuring_the_reading_gap_leaves_the_dropout_generator_as_it_was(tiny_model):
    """Training must draw the same dropout masks whether or how often the gap is measured."""
    after = {}
    for measure in (False, True):  # a fresh model each: a training step updates codebook statistics
        model = tiny_model(retrieval_top_k=1, retrieval_subspaces=4, retrieval_codes=3, lora_dropout=0.5)
        model.retrieval_keys.fit(DOCUMENTS)
        objective_of = StepObjective(model.train())
        torch.manual_seed(1)
        loss = objective_of(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1], Step("qa", True, measure_gap=measure)).loss
        after[measure] = (loss, torch.rand(4))
    assert torch.equal(after[True][0], after[False][0])
    assert torch.equal(after[True][1], after[False][1])  # the next draw: the generator was not moved


def test_reading_gap_is_not_measured_where_questions_read_the_whole_bank(tiny_model):
    model = tiny_model().eval()  # no retrieval keys: every question reads every document
    out = StepObjective(model)(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1], Step(measure_gap=True))
    assert out.reading_gap == 0


def test_held_reading_path_gets_no_gradient_and_the_llm_side_does(tiny_model):
    model = tiny_model().eval()
    with torch.no_grad():  # a prefix that is not zero, so that the LLM side has a gradient to show
        for parameter in model.prefix_expansion.parameters():
            parameter.normal_(0, 0.5)
    free = StepObjective(model)(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1], Step())
    held = StepObjective(model)(DOCUMENTS, QUESTIONS, ANSWERS, [0, 1], Step(hold_reading=True))
    assert torch.allclose(held.qa_loss, free.qa_loss) and held.loss == held.qa_loss  # no VQ term while held
    held.loss.backward()
    reading = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(READING_PATH)]
    assert reading and all(p.grad is not None and p.grad.abs().sum() == 0 for p in reading)  # in the graph (DDP)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prefix_expansion.parameters())


def test_schedule_holds_the_reading_path_for_the_first_qa_steps_and_measures_the_gap_every_n():
    config = TrainConfig(probe_steps=3, hold_reading_steps=2, gap_every=4)
    schedule = Schedule(config, total_steps=10, quantize=True)
    steps = [schedule.at(step, 8, float_memory=False) for step in range(10)]
    assert [s.objective for s in steps] == ["probe"] * 3 + ["qa"] * 7
    assert [s.hold_reading for s in steps] == [False] * 3 + [True] * 2 + [False] * 5
    assert [s.measure_gap for s in steps] == [(step + 1) % 4 == 0 for step in range(10)]


def test_taught_probe_step_trains_the_llm_side_on_the_hinted_qa_loss_and_the_reading_path_on_the_probe(tiny_model):
    model = tiny_model().eval()
    with torch.no_grad():  # a prefix that is not zero, so that the LLM side has a gradient to show
        for parameter in model.prefix_expansion.parameters():
            parameter.normal_(0, 0.5)
    plain = StepObjective(model)(DOCUMENTS[:2], QUESTIONS, ANSWERS, [0, 1], Step("probe"))
    taught = StepObjective(model)(DOCUMENTS[:2], QUESTIONS, ANSWERS, [0, 1], Step("probe", teach_reading=1.0))
    assert torch.allclose(taught.probe_loss, plain.probe_loss) and taught.qa_loss > 0
    assert torch.allclose(taught.loss, taught.probe_loss + taught.qa_loss + taught.vq_loss * model.config.vq_weight)
    # the reading path's gradient is the probe's alone: the hinted QA loss does not reach it
    plain.loss.backward()
    probe_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    taught.loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and name.startswith(READING_PATH):
            assert torch.allclose(parameter.grad, probe_grads[name], atol=1e-6), name
    assert any(p.grad.abs().sum() > 0 for p in model.prefix_expansion.parameters())


def test_answer_hint_adds_the_first_answer_tokens_direction_at_the_slots_norm(tiny_model):
    model = tiny_model().eval()
    modulation = torch.randn(2, model.config.num_slots, model.llm.layout.hidden_size)
    hinted = with_answer_hint(model, modulation, ANSWERS, 0.5)
    hint = hinted - modulation
    embedding = model.llm.model.get_output_embeddings().weight[model.llm.answer_ids(ANSWERS[1])[0]]
    assert torch.allclose(hint.norm(dim=-1), 0.5 * modulation.norm(dim=-1), atol=1e-5)
    assert torch.allclose(torch.cosine_similarity(hint[1], embedding[None], dim=-1), torch.ones(1), atol=1e-5)


def test_schedule_teaches_reading_over_the_last_probe_steps_with_a_falling_hint():
    schedule = Schedule(TrainConfig(probe_steps=6, teach_reading_steps=4), total_steps=10, quantize=True)
    assert [schedule.at(step, 8, False).teach_reading for step in range(10)] == [0, 0, 1, 0.75, 0.5, 0.25, 0, 0, 0, 0]
    with pytest.raises(MBCError, match="teach_reading_steps"):
        Schedule(TrainConfig(probe_steps=2, teach_reading_steps=3), total_steps=10, quantize=True)

"""CaMeLS (camels.py) on the tiny LLM: the weighting model starts at Uniform, meta-training moves
only it and lowers the QA loss after the inner step, and its weights reach online fine-tuning."""

import pytest
import torch
from typer.testing import CliRunner

from mbc.camels import CaMeLSConfig, MetaTraining, WeightingModel, meta_step, meta_train
from mbc.cli import app
from mbc.data.generated import generate_examples
from mbc.errors import MBCError
from mbc.finetuning import ClosedBookLLM, FinetuneConfig, OnlineFinetuning, qa_tune

SMALL = CaMeLSConfig(feature_layers=1, width=16, layers=1, heads=2, inner_layers=1, inner_learning_rate=0.05)


@pytest.fixture(scope="module")
def qa_tuned(tiny_paths, tmp_path_factory):
    torch.manual_seed(0)
    model = ClosedBookLLM.load(tiny_paths["llama"])
    pairs = [(r.question, r.answers[0]) for r in generate_examples(8, seed=1)]
    qa_tune(model, pairs, steps=20, learning_rate=3e-3, batch_size=8)
    folder = tmp_path_factory.mktemp("qa-tuned")
    model.save(folder, {"steps": 20})
    return folder


def test_a_fresh_weighting_model_is_uniform_fine_tuning(qa_tuned):
    model = ClosedBookLLM.load_qa_tuned(qa_tuned)
    weigher = WeightingModel.for_llm(SMALL, model)
    document = "Mira Okafor founded the Brellin Observatory in 1987."
    windows, _ = model.document_rows(document, 512)
    weights = weigher.weights([ids for ids, _ in windows])
    assert torch.allclose(weights, torch.ones_like(weights), atol=1e-5)
    with torch.no_grad():  # the weighted loss at weight 1 is the plain loss, term for term
        assert torch.allclose(model.loss(windows, weights), model.loss(windows), atol=1e-6)
    assert not any(p is q for p in weigher.parameters() for q in model.llm.parameters())


def test_meta_training_moves_only_the_weigher_and_lowers_the_qa_loss_after_the_step(qa_tuned):
    model = ClosedBookLLM.load_qa_tuned(qa_tuned)
    before = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    rows = list(generate_examples(8, seed=2))
    weigher, history = meta_train(model, SMALL, MetaTraining(steps=6, learning_rate=1e-2), rows)
    assert all(torch.equal(before[n], p) for n, p in model.llm.named_parameters())  # the LLM is unchanged
    assert all(p.requires_grad for p in model.llm.parameters())
    assert len(history) == 6 and all(h["qa_gain"] == h["qa_gain"] for h in history)  # no NaN
    windows, _ = model.document_rows(rows[0].document, 512)
    weights = weigher.weights([ids for ids, _ in windows])
    assert not torch.allclose(weights, torch.ones_like(weights))  # it learned something other than Uniform
    assert history[0]["qa_gain"] > 0  # one step on the document helps its own question


def test_the_outer_gradient_reaches_the_weigher_through_the_inner_step(qa_tuned):
    model = ClosedBookLLM.load_qa_tuned(qa_tuned)
    weigher = WeightingModel.for_llm(SMALL, model)
    row = list(generate_examples(8, seed=2))[0]
    model.llm.requires_grad_(False)
    meta_step(weigher, model, row.document, [model.training_row(row.question, row.answers[0])], "")
    assert weigher.head[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters())


def test_camels_weights_reach_online_fine_tuning_and_are_saved(qa_tuned, tmp_path):
    model = ClosedBookLLM.load_qa_tuned(qa_tuned)
    weigher, _ = meta_train(model, SMALL, MetaTraining(steps=2), list(generate_examples(8, seed=2)))
    weigher.save(tmp_path / "camels", {"qa_tuned": str(qa_tuned), "qa_tuned_fingerprint": _fp(qa_tuned)})
    loaded = WeightingModel.load(tmp_path / "camels", model, qa_tuned)
    ids = [model.document_rows("Mira Okafor founded it in 1987.", 512)[0][0][0]]
    assert torch.allclose(loaded.weights(ids), weigher.weights(ids))
    before = [p.detach().clone() for p in model.llm.parameters()]
    tuner = OnlineFinetuning(model, FinetuneConfig(learning_rate=1e-3, spans="camels"), loaded)
    tuner.adapt("Mira Okafor founded it in 1987.")
    assert any(not torch.equal(a, b) for a, b in zip(before, model.llm.parameters()))
    with pytest.raises(MBCError, match="needs its weighting model"):
        OnlineFinetuning(model, FinetuneConfig(spans="camels"))


def test_a_weigher_for_another_qa_tuned_llm_is_refused(qa_tuned, tmp_path):
    model = ClosedBookLLM.load_qa_tuned(qa_tuned)
    WeightingModel.for_llm(SMALL, model).save(tmp_path / "w", {"qa_tuned": "elsewhere", "qa_tuned_fingerprint": "0"})
    with pytest.raises(MBCError, match="was trained on the QA-tuned LLM elsewhere"):
        WeightingModel.load(tmp_path / "w", model, qa_tuned)
    with pytest.raises(MBCError, match="is not a CaMeLS weighting model"):
        WeightingModel.load(tmp_path, model, qa_tuned)


def test_bad_camels_settings_get_one_line_before_anything_loads(tmp_path):
    with pytest.raises(MBCError, match="inner_learning_rate must be above 0"):
        CaMeLSConfig(inner_learning_rate=0.0)
    with pytest.raises(MBCError, match="steps must be at least 1"):
        MetaTraining(steps=-3)
    runner = CliRunner()
    missing = runner.invoke(app, ["train-camels", "--qa-tuned", str(tmp_path), "--output", str(tmp_path / "c")])
    assert "is not a QA-tuned LLM" in str(missing.exception)
    zero = runner.invoke(app, ["train-camels", "--qa-tuned", str(tmp_path), "--inner-learning-rate", "0"])
    assert "inner_learning_rate must be above 0" in str(zero.exception)


def _fp(folder):
    from mbc.camels import qa_tuned_fingerprint

    return qa_tuned_fingerprint(folder)


def test_train_camels_then_eval_runs_camels_beside_uniform(qa_tuned, tiny_model, tmp_path):
    from mbc.evaluation.online import EvalConfig, run_eval

    runner = CliRunner()
    command = ["train-camels", "--qa-tuned", str(qa_tuned), "--data", "generated:3:40", "--steps", "2"]
    too_deep = runner.invoke(app, [*command, "--output", str(tmp_path / "deep"), "--feature-layers", "99"])
    assert "feature_layers is 99 but the LLM has only" in str(too_deep.exception)
    small = ["--feature-layers", "1", "--inner-layers", "1", "--output", str(tmp_path / "camels")]
    trained = runner.invoke(app, [*command, *small])
    assert trained.exit_code == 0, trained.output
    assert "meta-trained CaMeLS" in trained.output and "highest:" in trained.output
    assert len((tmp_path / "camels" / "metrics.jsonl").read_text().splitlines()) == 2

    rows = list(generate_examples(8, seed=3))[:12]  # 2 documents
    config = EvalConfig(retention_every=1, batch_size=8, methods=["uniform", "camels"], finetune_learning_rate=1e-3)
    summary = run_eval(
        tiny_model().eval(), rows, [], tmp_path / "eval", config, qa_tuned=qa_tuned, camels=tmp_path / "camels"
    )
    assert list(summary["methods"]) == ["uniform fine-tuning", "camels fine-tuning"]
    camels = summary["methods"]["camels fine-tuning"]
    assert camels["bytes_per_document"] == 0 and camels["adapt_ms_per_document"] > 0
    assert [p["documents"] for p in summary["retention"]["camels fine-tuning"]] == [1, 2]
    missing = runner.invoke(app, ["eval", "--method", "camels", "--camels", str(tmp_path / "camels")])
    assert "give --qa-tuned too" in str(missing.exception)


def test_retention_of_camels_fine_tuning(qa_tuned, tmp_path):
    from mbc.evaluation.retention import measure_finetuning_retention

    model = ClosedBookLLM.load_qa_tuned(qa_tuned)
    WeightingModel.for_llm(SMALL, model).save(
        tmp_path / "camels", {"qa_tuned": str(qa_tuned), "qa_tuned_fingerprint": _fp(qa_tuned)}
    )
    rows = list(generate_examples(8, seed=3))[:24]  # 4 documents: 2 steps of 2
    tuning = FinetuneConfig(learning_rate=1e-3, spans="camels")
    curve = measure_finetuning_retention(qa_tuned, rows, tuning, every=2, batch_size=8, camels=tmp_path / "camels")
    assert [p["documents"] for p in curve] == [2, 4]

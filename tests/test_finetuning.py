"""Online fine-tuning baselines (finetuning.py) on the tiny LLM: the QA-tuned start, the updates,
their place in `mbc eval`, and their bad settings."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mbc.cli import app
from mbc.data import documents
from mbc.data.generated import generate_examples
from mbc.errors import MBCError
from mbc.evaluation.metrics import score
from mbc.evaluation.online import EvalConfig, run_eval
from mbc.evaluation.report import format_table
from mbc.finetuning import ClosedBookLLM, FinetuneConfig, OnlineFinetuning, qa_tune, salient_spans


def test_salient_spans_are_names_numbers_and_dates():
    text = "The Brellin Observatory was founded by Mira Okafor in 1987. In March 2003 it had 2,400 visitors."
    spans = {text[a:b] for a, b in salient_spans(text)}
    assert {"Brellin Observatory", "Mira Okafor", "1987", "March 2003", "2,400"} <= spans
    assert not {"The", "In"} & spans  # a capitalised word opening a sentence is an ordinary word


def test_bad_fine_tuning_settings_get_one_line():
    with pytest.raises(MBCError, match="learning_rate must be above 0"):
        FinetuneConfig(learning_rate=0.0)
    with pytest.raises(MBCError, match="steps_per_document must be at least 1"):
        FinetuneConfig(steps_per_document=-1)
    with pytest.raises(MBCError, match="spans must be one of"):
        FinetuneConfig(spans="some")
    with pytest.raises(MBCError, match="learning_rate must be above 0"):
        EvalConfig(finetune_learning_rate=0.0)


def test_the_commands_default_to_finetune_configs_settings():
    from mbc.cli import FinetuneRateOption, FinetuneStepsOption

    assert FinetuneRateOption.default == FinetuneConfig.learning_rate == EvalConfig.finetune_learning_rate
    assert FinetuneStepsOption.default == FinetuneConfig.steps_per_document == EvalConfig.finetune_steps


@pytest.fixture(scope="module")
def qa_tuned(tiny_paths, tmp_path_factory):
    torch.manual_seed(0)
    model = ClosedBookLLM.load(tiny_paths["llama"])
    pairs = [(r.question, r.answers[0]) for r in generate_examples(8, seed=1)]
    losses = qa_tune(model, pairs, steps=30, learning_rate=3e-3, batch_size=8)
    assert sum(losses[-5:]) / 5 < losses[0]  # it learns the format
    folder = tmp_path_factory.mktemp("qa-tuned")
    model.save(folder, {"steps": 30})
    return folder


def test_a_document_reaches_the_weights_by_all_tokens_or_by_salient_ones(qa_tuned, tiny_paths):
    def changed(spans: str, document: str) -> tuple[bool, int]:
        model = ClosedBookLLM.load_qa_tuned(qa_tuned)
        before = [p.detach().clone() for p in model.llm.parameters()]
        tuner = OnlineFinetuning(model, FinetuneConfig(learning_rate=1e-3, steps_per_document=2, spans=spans))
        tuner.adapt(document)
        return any(not torch.equal(a, b) for a, b in zip(before, model.llm.parameters())), tuner.skipped

    assert changed("all", "a plain sentence with nothing salient in it.") == (True, 0)
    assert changed("salient", "a plain sentence with nothing salient in it.") == (False, 1)
    assert changed("salient", "Mira Okafor founded it in 1987.") == (True, 0)
    with pytest.raises(MBCError, match="is not a QA-tuned LLM"):
        ClosedBookLLM.load_qa_tuned(tiny_paths["llama"])


def test_eval_runs_the_fine_tuning_methods_beside_the_memories(qa_tuned, tiny_model, tmp_path):
    rows = list(generate_examples(8, seed=3))[:18]  # 3 documents
    config = EvalConfig(
        retention_every=2, batch_size=8, methods=["mbc", "qa-tuned", "uniform", "salient"], finetune_learning_rate=1e-3
    )
    summary = run_eval(tiny_model().eval(), rows, [], tmp_path, config, qa_tuned=qa_tuned)
    methods = summary["methods"]
    assert list(methods) == ["mbc", "QA-tuned, closed book", "uniform fine-tuning", "salient spans (rules)"]
    for name in ("uniform fine-tuning", "salient spans (rules)"):
        assert methods[name]["bytes_per_document"] == 0 and methods[name]["adapt_ms_per_document"] > 0
        assert methods[name]["adapt_peak_mb"] is not None
        assert [p["documents"] for p in summary["retention"][name]] == [2, 3]
    assert methods["QA-tuned, closed book"]["adapt_ms_per_document"] is None
    assert "QA-tuned, closed book" not in summary["retention"]
    assert methods["mbc"]["adapt_peak_mb"] is not None
    assert "adapt MB" in format_table(summary)


def test_fine_tuning_alone_draws_retention_but_no_bank_size(qa_tuned, tiny_model, tmp_path):
    rows = list(generate_examples(8, seed=3))[:18]  # 3 documents
    config = EvalConfig(retention_every=2, batch_size=8, methods=["uniform"], finetune_learning_rate=1e-3)
    summary = run_eval(tiny_model().eval(), rows, [], tmp_path, config, qa_tuned=qa_tuned)
    assert summary["files"] == ["predictions.csv", "summary.json", "retention.png"]
    assert (tmp_path / "retention.png").exists() and not (tmp_path / "bank_size.png").exists()


def test_mbc_eval_refuses_bad_fine_tuning_input_before_loading(tmp_path):
    runner = CliRunner()
    not_tuned = runner.invoke(app, ["eval", "--qa-tuned", str(tmp_path), "--method", "uniform"])
    assert "is not a QA-tuned LLM" in str(not_tuned.exception)
    zero = runner.invoke(app, ["eval", "--qa-tuned", str(tmp_path), "--finetune-learning-rate", "0"])
    assert "learning_rate must be above 0" in str(zero.exception)
    missing = runner.invoke(app, ["eval", "--method", "uniform", "--mac", str(tmp_path)])
    assert "--qa-tuned" in str(missing.exception)


def test_retention_of_fine_tuning_is_measured_as_the_memories_are(qa_tuned):
    from mbc.evaluation.retention import format_retention, measure_finetuning_retention

    rows = list(generate_examples(8, seed=3))[:24]  # 4 documents: 2 steps of 2
    curve = measure_finetuning_retention(qa_tuned, rows, FinetuneConfig(learning_rate=1e-3), every=2, batch_size=8)
    assert [p["documents"] for p in curve] == [2, 4] and all(p["recall_percent"] is None for p in curve)
    table = format_retention({"uniform fine-tuning": curve})
    assert "uniform fine-tuning F1" in table
    # Where the LLM began: the first documents' questions answered closed-book before any update.
    first = [r for r in rows if r.document in documents(rows)[:2]]
    with torch.no_grad():
        closed_book = score(
            ClosedBookLLM.load_qa_tuned(qa_tuned).answer([r.question for r in first]), [list(r.answers) for r in first]
        )
    assert curve[0]["before_stream"] == {"em": closed_book["em"], "f1": closed_book["f1"]}
    assert "before_stream" not in curve[1]
    assert table.splitlines()[1].split() == ["before", f"{closed_book['f1']:.1f}"]


def test_the_retention_command_measures_one_fine_tuning_beside_an_earlier_curve(qa_tuned, tmp_path):
    runner = CliRunner()
    stream = ["retention", "--data", "generated:3:10", "--every", "5", "--output", str(tmp_path / "out")]
    earlier = tmp_path / "earlier.json"  # a memory's curve over the same stream, measured before
    point = {"em": 10.0, "f1": 20.0, "retention_percent": 100.0, "recall_percent": 100.0}
    curve = [{"documents": n, **point} for n in (5, 10)]
    earlier.write_text(json.dumps({"curves": {"mbc": curve}, "data": "generated:3:10"}))
    args = [*stream, "--qa-tuned", str(qa_tuned), "--finetune-learning-rate", "1e-3", "--beside", str(earlier)]
    result = runner.invoke(app, [*args, "--finetuning", "uniform"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "retention.json").read_text())
    assert list(saved["curves"]) == ["mbc", "uniform fine-tuning"] and saved["complete"] is True
    assert [p["documents"] for p in saved["curves"]["uniform fine-tuning"]] == [5, 10]
    for bad, says in (
        (["--finetuning", "some"], "is not one of uniform, salient, camels"),
        (["--finetuning", "camels"], "give --camels"),
    ):
        refused = runner.invoke(app, [*args, *bad])
        assert refused.exit_code != 0 and says in str(refused.exception), refused.output
    alone = runner.invoke(app, [*stream, "--finetuning", "uniform", "--beside", str(earlier)])
    assert "give --qa-tuned" in str(alone.exception)

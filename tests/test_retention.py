"""Retention over a stream: the questions about the first documents asked again as the bank grows."""

import json

from conftest import DOCUMENTS, MORE_DOCUMENTS
from typer.testing import CliRunner

from mbc.cli import app
from mbc.data import QAExample
from mbc.errors import MBCError
from mbc.evaluation.metrics import retention_percent
from mbc.evaluation.retention import format_retention, measure_retention
from mbc.model import MBCModel

STREAM = DOCUMENTS + MORE_DOCUMENTS  # 8 documents
ROWS = [QAExample(d, f"What does document {i} say?", (d.split()[0],), f"d{i}", "test") for i, d in enumerate(STREAM)]


def test_retention_asks_the_first_documents_again_after_every_step(tiny_checkpoint, tmp_path):
    model = MBCModel.from_pretrained(tiny_checkpoint).eval()
    curve = measure_retention(model, ROWS, tmp_path, every=3, batch_size=2)
    assert [p["documents"] for p in curve] == [3, 6, 8]
    for point in curve:  # the model reads its top-1 document by key: recall is measured at every point
        assert 0.0 <= point["recall_percent"] <= 100.0 and 0.0 <= point["f1"] <= 100.0
        assert [s["question"] for s in point["sample"]] == [r.question for r in ROWS[:3]]  # what it answered
        if curve[0]["f1"]:
            assert abs(point["retention_percent"] - 100 * point["f1"] / curve[0]["f1"]) < 1e-9
        else:  # nothing right at first: nothing to retain, no percent
            assert point["retention_percent"] is None
    assert list(tmp_path.glob("retention-3*.db"))  # the bank is kept, named, never overwritten
    assert measure_retention(model, ROWS, tmp_path, every=3, batch_size=2) == curve  # a second bank, same result
    assert len(list(tmp_path.glob("retention-3*.db"))) == 2
    assert "documents" in format_retention({"mbc": curve}).splitlines()[0]


def test_retention_command_writes_the_curve_and_the_plot(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["retention", "--model", tiny_checkpoint, "--data", "generated:3:20", "--every", "8", "--output", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "retention.json").read_text())
    assert [p["documents"] for p in saved["curves"]["mbc"]] == [8, 16, 20] and (out / "retention.png").exists()
    too_few = runner.invoke(app, [*args[:-2], "--every", "11", "--output", str(out)])
    assert too_few.exit_code != 0 and "fewer than two steps of 11" in str(too_few.exception)


def test_retention_is_a_percent_of_the_first_f1_and_none_without_one():
    assert retention_percent(20.0, 25.0) == 80.0 and retention_percent(25.0, 25.0) == 100.0
    assert retention_percent(0.0, 0.0) is None and retention_percent(5.0, 0.0) is None
    curve = [{"documents": 3, "f1": 0.0, "retention_percent": None, "recall_percent": None}]
    assert "-" in format_retention({"mbc": curve}).splitlines()[1]


def test_an_earlier_runs_curves_stand_beside_this_runs_and_are_not_measured_again(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    stream = ["--data", "generated:3:20", "--every", "8"]
    first = runner.invoke(app, ["retention", "--model", tiny_checkpoint, *stream, "--output", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    earlier = tmp_path / "a" / "retention.json"
    assert json.loads(earlier.read_text())["complete"] is True
    args = ["retention", "--mac", tiny_checkpoint, "--beside", str(earlier), "--output", str(tmp_path / "b")]
    second = runner.invoke(app, [*args, *stream])
    assert second.exit_code == 0, second.output
    saved = json.loads((tmp_path / "b" / "retention.json").read_text())
    assert list(saved["curves"]) == ["mbc", "mac"] and saved["beside"] == {"mbc": str(earlier)}
    assert saved["curves"]["mbc"] == json.loads(earlier.read_text())["curves"]["mbc"]  # drawn, not measured
    assert list(saved["checkpoints"]) == ["mac"] and "mac F1" in second.output and "mbc F1" in second.output

    def refused(*extra: str) -> str:
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code != 0 and isinstance(result.exception, MBCError), result.output
        return str(result.exception)

    assert "give the same --every" in refused("--data", "generated:3:20", "--every", "5")
    assert "give the same --data" in refused("--data", "generated:4:20", "--every", "8")
    assert "measured by this run and given by" in refused(*stream, "--model", tiny_checkpoint)
    unfinished = json.loads(earlier.read_text())
    unfinished["curves"]["mbc"] = unfinished["curves"]["mbc"][:2]
    (tmp_path / "unfinished.json").write_text(json.dumps(unfinished))
    assert "stops early" in refused(*stream, "--beside", str(tmp_path / "unfinished.json"))
    (tmp_path / "other.json").write_text("{}")
    assert "is not a retention.json" in refused(*stream, "--beside", str(tmp_path / "other.json"))

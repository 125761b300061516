import json
from pathlib import Path

from typer.testing import CliRunner

from mbc.cli import app

runner = CliRunner()


def _tiny_sets(paths):
    values = {
        "llm": paths["llama"],
        "document_encoder": paths["bert"],
        "question_encoder": paths["bert"],
        "num_slots": 4,
        "codebook_size": 16,
        "prefix_layers": 2,
        "lora_layers": 2,
        "lora_rank": 4,
        "aggregator_blocks": 1,
        "aggregator_heads": 2,
        "aggregator_head_dim": 8,
        "retrieval_top_k": 1,
        "retrieval_subspaces": 4,
        "retrieval_codes": 4,
        "max_document_tokens": 96,  # the tiny encoders' window is 256
        "max_question_tokens": 48,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _train(paths, out, steps: int, warm_starts: tuple[str, str], extra: list[str] = ()):
    """`mbc train` of the cpu preset on 30 generated documents with the tiny backbones."""
    settings = ["batch_size=4", "eval_questions=4", *warm_starts]
    arguments = ["train", "--preset", "cpu", "--data", "generated", "--first-documents", "30", "--output", str(out)]
    arguments += ["--max-steps", str(steps), *[x for s in settings for x in ("--train-set", s)]]
    return runner.invoke(app, [*arguments, *_tiny_sets(paths), *extra])


def test_a_training_stopped_midway_still_gets_its_loss_plot(tiny_paths, tmp_path, monkeypatch):
    from mbc.errors import MBCError
    from mbc.training import trainer

    def stopped(model_config, config, *args, **kwargs):
        step = {"kind": "train", "step": 10, "loss": 3.0, "qa": 3.0, "vq": 0.1, "probe": 0.0}
        (Path(config.output_dir) / "metrics.jsonl").write_text(json.dumps(step) + "\n")
        raise MBCError("interrupted by SIGTERM at step 10 of 20: the run is saved")

    monkeypatch.setattr(trainer, "train", stopped)
    out = tmp_path / "run"
    out.mkdir()
    result = _train(tiny_paths, out, steps=20, warm_starts=())
    assert isinstance(result.exception, MBCError)  # `mbc` turns it into one line (test_bad_input.py)
    assert (out / "loss.png").stat().st_size > 1000


def test_train_then_validate_from_the_command_line(tiny_paths, tmp_path):
    out = tmp_path / "run"
    # the preset's warm start, shortened
    result = _train(
        tiny_paths,
        out,
        steps=3,
        warm_starts=("probe_steps=1", "teach_reading_steps=1", "float_memory_steps=2", "gap_every=1"),
    )
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reading_gap" in record for record in logged if record["kind"] == "train")
    assert json.loads(result.stdout[result.stdout.index("{\n") :])["validation"]["loss"] > 0
    assert (out / "loss.png").stat().st_size > 1000 and (out / "last" / "mbc_config.json").exists()
    scores = tmp_path / "scores.json"
    result = runner.invoke(
        app,
        [
            "validate",
            str(out / "last"),
            "--data",
            "generated",
            "--first-documents",
            "30",
            "--questions",
            "6",
            "--output",
            str(scores),
        ],
    )
    assert result.exit_code == 0, result.output
    methods = json.loads(scores.read_text())["results"]
    assert set(methods) == {
        "mbc",
        "mbc, bank of unrelated documents",
        "base LLM, raw question",
        "base LLM, 3 worked examples",
    }


def test_info_and_bad_override(tiny_paths):
    result = runner.invoke(app, ["info", *_tiny_sets(tiny_paths)])
    assert result.exit_code == 0 and "bank per document: MBC 2 bytes" in result.output
    result = runner.invoke(app, ["info", "--set", "no_such_field=1"])
    assert result.exit_code != 0 and "unknown setting 'no_such_field'" in str(result.exception)


def test_demo_runs_the_pipeline_once(tiny_paths):
    result = runner.invoke(app, ["demo", *_tiny_sets(tiny_paths), "--set", "retrieval_top_k=0"])
    assert result.exit_code == 0, result.output
    assert "training loss on one example" in result.output and "compressed 2 documents" in result.output
    assert "greedy:" in result.output and "diverse_beam:" in result.output
    result = runner.invoke(app, ["demo", *_tiny_sets(tiny_paths)])  # retrieval keys need training to fit them
    assert result.exit_code != 0 and "retrieval_top_k=0" in str(result.exception)


def test_eval_streams_documents_and_compares_methods(tiny_paths, tmp_path):
    checkpoints = {}
    for name, extra in (("mbc", []), ("mac", ["--set", "quantize=false"])):
        out = tmp_path / name
        result = _train(
            tiny_paths,
            out,
            steps=1,
            warm_starts=("probe_steps=0", "teach_reading_steps=0", "float_memory_steps=0"),
            extra=extra,
        )
        assert result.exit_code == 0, result.output
        checkpoints[name] = out / "last"
    result = runner.invoke(
        app,
        [
            "eval",
            str(checkpoints["mbc"]),
            "--mac",
            str(checkpoints["mac"]),
            "--data",
            "generated",
            "--first-documents",
            "30",
            "--documents",
            "3",
            "--retention-every",
            "2",
            "--output",
            str(tmp_path / "eval"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "base, BM25 top-1" in result.output and "mbc F1 retention" in result.output
    assert "mbc retrieval keys found the question's own document for" in result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["documents"] == 3 and len(summary["methods"]) == 8
    result = runner.invoke(
        app,
        [
            "eval",
            str(checkpoints["mbc"]),
            "--data",
            "generated",
            "--first-documents",
            "30",
            "--documents",
            "2",
            *("--method", "mbc", "--method", "mbc-unrelated"),
            "--output",
            str(tmp_path / "some"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "some" / "summary.json").read_text())["methods"]) == {
        "mbc",
        "mbc, unrelated bank",
    }
    mac_only = ["--mac", str(checkpoints["mac"]), "--methods", "mac,mac, unrelated bank,base, 3 worked examples"]
    common = ["--data", "generated", "--first-documents", "30", "--documents", "2"]
    result = runner.invoke(app, ["eval", *mac_only, *common, "--output", str(tmp_path / "mac-only")])
    assert result.exit_code == 0, result.output  # no MBC checkpoint needed where no MBC method runs
    assert set(json.loads((tmp_path / "mac-only" / "summary.json").read_text())["methods"]) == {
        "mac",
        "mac, unrelated bank",
        "base, 3 worked examples",
    }
    result = runner.invoke(
        app,
        [
            "eval",
            str(checkpoints["mbc"]),
            "--data",
            "generated",
            "--first-documents",
            "30",
            *("--method", "mbc", "--method", "telepathy"),
            "--output",
            str(tmp_path / "bad"),
        ],
    )
    assert result.exit_code != 0 and "unknown method 'telepathy'" in str(result.exception)


def test_mac_trains_from_a_mbc_run_float_memory_state(tiny_paths, tmp_path):
    warm = ("probe_steps=1", "teach_reading_steps=1", "float_memory_steps=2", "eval_questions=0")
    mbc = _train(tiny_paths, tmp_path / "mbc", 3, warm, ["--train-set", "keep_float_memory_state=true"])
    assert mbc.exit_code == 0, mbc.output
    mac_args = ["--set", "quantize=false", "--start-from", str(tmp_path / "mbc" / "float-memory")]
    mac = _train(tiny_paths, tmp_path / "mac", 3, warm, mac_args)
    assert mac.exit_code == 0, mac.output
    assert [json.loads(line)["step"] for line in (tmp_path / "mac" / "metrics.jsonl").read_text().splitlines()] == [3]
    missing = _train(tiny_paths, tmp_path / "mac2", 3, warm, [*mac_args[:2], "--start-from", str(tmp_path)])
    assert missing.exit_code != 0 and "holds no float-memory state" in str(missing.exception)


def test_eval_refuses_methods_whose_model_is_not_given_before_loading_anything(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "nowhere"), "--methods", "tokens,tokens, unrelated bank"])
    assert result.exit_code != 0
    assert "'tokens' a token memory (--tokens)" in str(result.exception)  # not "nowhere is not a checkpoint"

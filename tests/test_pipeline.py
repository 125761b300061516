import json
from pathlib import Path

import pytest
from conftest import tiny_config

from mbc import data as qa_data
from mbc.errors import MBCError
from mbc.paths import cache_dir
from mbc.pipeline import MainJobConfig, _train_or_reuse
from mbc.training.trainer import FLOAT_MEMORY_STATE, TrainConfig


def test_main_job_trains_once_then_reuses_the_cached_adapter(tiny_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("MBC_CACHE", str(tmp_path / "cache"))
    splits = qa_data.standard_split(qa_data.first_documents(qa_data.load("generated"), 30))
    config = tiny_config(tiny_paths)

    def train_config():
        return TrainConfig(batch_size=4, max_steps=1, eval_questions=4, log_every=1)

    first = _train_or_reuse("mbc", config, train_config(), splits, MainJobConfig())
    assert first.parent.parent == cache_dir() / "trained" and (first / "model.safetensors").exists()
    metrics = (first.parent / "metrics.jsonl").read_text()
    again = _train_or_reuse("mbc", config, train_config(), splits, MainJobConfig())
    assert again == first and (first.parent / "metrics.jsonl").read_text() == metrics  # reused, not retrained
    other = _train_or_reuse("mbc", tiny_config(tiny_paths, num_slots=2), train_config(), splits, MainJobConfig())
    assert other != first  # another setting, another adapter


def test_main_job_mac_starts_where_mbc_left_its_float_memory(tiny_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("MBC_CACHE", str(tmp_path / "cache"))
    splits = qa_data.standard_split(qa_data.first_documents(qa_data.load("generated"), 30))

    def train_config(quantize):
        return TrainConfig(
            batch_size=4, max_steps=3, float_memory_steps=2, eval_questions=0, keep_float_memory_state=quantize
        )

    mbc = _train_or_reuse("mbc", tiny_config(tiny_paths), train_config(True), splits, MainJobConfig())
    start = mbc.parent / FLOAT_MEMORY_STATE
    mac_config = tiny_config(tiny_paths, quantize=False)
    mac = _train_or_reuse("mac", mac_config, train_config(False), splits, MainJobConfig(), start_from=start)
    steps = [json.loads(line)["step"] for line in (mac.parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3]  # steps 1-2 were MBC's
    alone = _train_or_reuse("mac", mac_config, train_config(False), splits, MainJobConfig())
    assert alone != mac  # the state it starts from is part of what names it


def test_main_job_evaluates_its_methods_and_trains_without_the_in_training_gap():
    from mbc.evaluation.online import DEFAULT_METHODS, EvalConfig
    from mbc.pipeline import _adapter_settings

    job = MainJobConfig()
    methods = EvalConfig(methods=list(job.methods)).methods  # each a known method
    assert "base, raw question" not in methods and set(methods) == set(DEFAULT_METHODS) - {"base, raw question"}
    for quantize in (True, False):
        assert _adapter_settings(quantize, job)[1].gap_every == 0


def test_the_default_model_says_it_was_trained_on_fiction(tiny_checkpoint, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mbc import pipeline
    from mbc.cli import app

    monkeypatch.setattr(pipeline, "default_model", lambda: Path(tiny_checkpoint))
    said = []
    assert pipeline.model_or_default(None, said.append) == Path(tiny_checkpoint)
    assert "fictional documents" in said[0] and tiny_checkpoint in said[0]
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "bank.db"), "-"], input="Mira founded it.\n")
    assert result.exit_code == 0 and "trained on generated fictional documents" in result.output


def test_mbc_model_names_the_model_a_user_gets_without_model(tiny_checkpoint, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mbc import pipeline
    from mbc.cli import app

    monkeypatch.setattr(pipeline, "default_model", lambda: pytest.fail("$MBC_MODEL was not used"))
    monkeypatch.setenv("MBC_MODEL", str(tiny_checkpoint))
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "bank.db"), "-"], input="Mira founded it.\n")
    assert result.exit_code == 0, result.output
    assert f"using the model in {tiny_checkpoint}" in result.output and "fictional" not in result.output


def test_a_given_model_says_what_it_was_trained_on(tiny_checkpoint, tmp_path):
    from mbc import data, pipeline
    from mbc.model import MBCModel

    said = []
    assert pipeline.model_or_default(tiny_checkpoint, said.append) == Path(tiny_checkpoint)
    assert said == [f"using the model in {tiny_checkpoint}, whose training data is not recorded"]
    model = MBCModel.from_pretrained(tiny_checkpoint)
    rows = data.load_splits("generated", 20)["train"]
    model.trained_on = data.describe_training("data/squad.json", rows, ("more/extra.json",))
    model.save_pretrained(tmp_path / "model")
    pipeline.model_or_default(tmp_path / "model", said.append)
    documents = len(data.documents(rows))
    assert (
        f"trained on {documents} documents and {len(rows)} questions of squad.json (train split) + extra.json"
        in said[1]
    )
    assert MBCModel.from_pretrained(tmp_path / "model").trained_on == model.trained_on  # kept by a reload
    assert "generated fictional documents" in data.describe_training("generated:3", rows)
    with pytest.raises(MBCError, match="not an MBC checkpoint"):
        pipeline.model_or_default(tmp_path / "missing", said.append)

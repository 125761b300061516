from conftest import tiny_config

from mbc import data as qa_data
from mbc.paths import cache_dir
from mbc.pipeline import MainJobConfig, _train_or_reuse
from mbc.training.trainer import TrainConfig


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

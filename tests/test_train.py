import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from mbc import MBCError
from mbc.checkpoint import WEIGHTS_NAME
from mbc.data import split_by_group
from mbc.data.generated import ANSWER_KINDS, generate_examples
from mbc.model import MBCModel
from mbc.training.state import saved_progress
from mbc.training.trainer import TrainConfig, train

VALIDATION_KEYS = {"em", "f1", "lenient_em", "loss"}
GAP_KEYS = {"gap_em", "gap_f1", "gap_lenient_em", "gap_loss"}  # own documents minus unrelated ones
KIND_KEYS = {
    f"{metric}_{kind}" for metric in ("em", "f1") for kind in ANSWER_KINDS
}  # generated data: scores by answer kind
ROWS = split_by_group(generate_examples(30, seed=1), {"train": 0.8, "validation": 0.2})


def _values(out, **overrides) -> dict:
    values = dict(
        output_dir=str(out),
        batch_size=4,
        learning_rate=3e-3,
        max_steps=4,
        eval_every=1000,
        log_every=1,
        eval_questions=6,
        seed=0,
    )
    return {**values, **overrides}


def _train(tiny_paths, out, model_overrides: dict | None = None, **overrides):
    config = tiny_config(tiny_paths, "gpt2", "bert", lora_dropout=0.0, **(model_overrides or {}))
    return train(config, TrainConfig(**_values(out, **overrides)), ROWS["train"], ROWS["validation"])


def test_training_writes_metrics_and_checkpoints(tiny_paths, tmp_path):
    metrics = _train(tiny_paths, tmp_path, max_steps=6, eval_every=3, grad_accumulation=2, backprop_keep=0.5)
    assert VALIDATION_KEYS | GAP_KEYS <= set(metrics) <= VALIDATION_KEYS | GAP_KEYS | KIND_KEYS
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "qa", "vq", "codes_alive", "rows_per_second"} <= set(train_records[0])
    assert [r["step"] for r in records if r["kind"] == "validation"] == [3, 6]
    for folder in ("best-em", "best-f1", "best-loss", "last"):
        assert (tmp_path / folder / WEIGHTS_NAME).exists()


def test_save_best_off_keeps_only_the_last_checkpoint(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path, max_steps=2, eval_every=1, save_best=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["last"]
    assert (tmp_path / "last" / WEIGHTS_NAME).exists()


def test_training_lowers_the_loss(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path, max_steps=30, log_every=5, learning_rate=1e-2)
    losses = [
        json.loads(line)["qa"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line
    ]
    assert losses[-1] < 0.9 * losses[0]


def test_training_with_retrieval_keys_fits_them_once(tiny_paths, tmp_path):
    keys = dict(retrieval_top_k=2, retrieval_subspaces=4, retrieval_codes=4)
    metrics = _train(tiny_paths, tmp_path, keys, max_steps=2)
    assert VALIDATION_KEYS | GAP_KEYS <= set(metrics) <= VALIDATION_KEYS | GAP_KEYS | KIND_KEYS
    first = load_file(tmp_path / "last" / WEIGHTS_NAME)
    assert (
        bool(first["retrieval_keys.quantizer.fitted"]) and first["retrieval_keys.quantizer.centroids"].abs().sum() > 0
    )
    _train(tiny_paths, tmp_path, keys, max_steps=4)  # resumed: the centroids come from the checkpoint, not a new fit
    assert torch.equal(
        load_file(tmp_path / "last" / WEIGHTS_NAME)["retrieval_keys.quantizer.centroids"],
        first["retrieval_keys.quantizer.centroids"],
    )


def test_float_memory_warm_start_then_a_fitted_codebook(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path, max_steps=4, float_memory_steps=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vq = {r["step"]: r["vq"] for r in records if r["kind"] == "train"}
    assert vq[1] == vq[2] == 0 and vq[3] > 0 and vq[4] > 0  # float memory first, then the codebook
    model = MBCModel.from_pretrained(tmp_path / "last")
    assert model.quantizer.fraction_alive() == 1.0


def test_vocabulary_codes_train_through_the_warm_start_and_keep_no_table(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path, {"codebook": "vocabulary"}, max_steps=4, float_memory_steps=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = {r["step"]: r for r in records if r["kind"] == "train"}
    assert train_records[2]["vq"] == 0 and train_records[4]["vq"] > 0  # the commitment term after the warm start
    assert 0 < train_records[4]["codes_alive"] <= 1  # the share of distinct tokens among the batch's vectors
    assert not [name for name in load_file(tmp_path / "last" / WEIGHTS_NAME) if name.startswith("quantizer.")]
    model = MBCModel.from_pretrained(tmp_path / "last").eval()
    assert model.compress([ROWS["validation"][0].document]).shape == (1, 4, 1)


def test_input_reading_trains_validates_and_saves(tiny_paths, tmp_path):
    overrides = {"codebook": "vocabulary", "code_reading": "input", "retrieval_top_k": 1, "retrieval_codes": 4}
    # The tiny Llama: the worked-example prompt is longer than the tiny GPT-2's 256 positions.
    config = tiny_config(tiny_paths, "llama", "bert", lora_dropout=0.0, **overrides)
    values = _values(tmp_path, max_steps=4, naming_only_steps=2, naming_steps=3, eval_every=4)
    metrics = train(config, TrainConfig(**values), ROWS["train"], ROWS["validation"])
    assert VALIDATION_KEYS <= set(metrics)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if r["kind"] == "train"}
    assert steps[1]["qa"] == steps[2]["qa"] == 0 and steps[2]["naming"] > 0  # naming alone: no LLM pass
    assert steps[3]["qa"] > 0 and steps[3]["naming"] > 0 and steps[4]["naming"] == 0
    assert MBCModel.from_pretrained(tmp_path / "last").reads_input


def test_a_run_stopped_during_the_warm_start_still_fits_its_codebook(tiny_paths, tmp_path):
    metrics = _train(tiny_paths, tmp_path, max_steps=10, float_memory_steps=5, max_minutes=0.0)  # stops after step 1
    assert VALIDATION_KEYS <= set(metrics)  # validated through the fitted codebook
    model = MBCModel.from_pretrained(tmp_path / "last")
    assert model.quantizer.fraction_alive() == 1.0


def test_bad_schedules_are_refused_before_training(tiny_paths, tmp_path):
    with pytest.raises(MBCError, match="float_memory_steps=4 is not below the run's 4 steps"):
        _train(tiny_paths, tmp_path, max_steps=4, float_memory_steps=4)
    with pytest.raises(MBCError, match="lr_schedule"):
        _train(tiny_paths, tmp_path, lr_schedule="step")


def test_cosine_schedule_decays_to_zero_after_warmup(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path, max_steps=6, warmup_ratio=0.2, lr_schedule="cosine")
    rates = [
        json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line
    ]
    # The rate logged at step s is the one step s + 1 will use: warmup ends at step 2.
    assert rates[0] < rates[1] == pytest.approx(3e-3) and rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))


def test_fit_codebook_makes_the_bank_closer_to_the_documents(tiny_model):
    model = tiny_model(codebook_size=8).eval()
    documents = [f"Document {i} says that the town of Quel{i} exports {i} rugs." for i in range(12)]
    contexts = model.amortize(documents)

    def error() -> float:
        return (model.memory(model.compress(documents)).view_as(contexts) - contexts).pow(2).mean().item()

    before = error()
    model.fit_codebook(documents, batch_size=5)
    assert error() < before and not model.training


def test_codebook_gets_its_own_learning_rate(tiny_model):
    from mbc.training.trainer import parameter_groups

    model = tiny_model()
    groups = parameter_groups(
        model, TrainConfig(learning_rate=1e-3, encoder_learning_rate=1e-4, codebook_learning_rate=1e-2)
    )
    rates = {group["lr"]: group["params"] for group in groups}
    assert set(rates) == {1e-3, 1e-4, 1e-2}
    assert rates[1e-2] == [model.quantizer.stages[0].codebook]


def test_resume_continues_exactly(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path / "straight", max_steps=6, eval_every=3)
    _train(tiny_paths, tmp_path / "resumed", max_steps=3, eval_every=3)  # stops after step 3 and saves
    _train(tiny_paths, tmp_path / "resumed", max_steps=6, eval_every=3)  # picks up at step 3
    straight = load_file(tmp_path / "straight" / "last" / WEIGHTS_NAME)
    resumed = load_file(tmp_path / "resumed" / "last" / WEIGHTS_NAME)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name


def test_two_processes_end_with_identical_weights(tiny_paths, tmp_path):
    script = Path(__file__).parent / "two_process_training.py"
    paths = json.dumps(tiny_paths)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        paths,
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert first.keys() == second.keys() and len(first) > 10
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert any(not torch.equal(first[name], load_file(tmp_path / "initial.safetensors")[name]) for name in first)


def test_probe_warm_start_trains_the_probe_then_the_qa_loss(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path, max_steps=4, probe_steps=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert [r["qa"] == 0 and r["probe"] > 0 for r in records] == [True, True, False, False]
    assert all(r["qa"] > 0 and r["probe"] == 0 for r in records[2:])
    with pytest.raises(MBCError, match="probe_steps=4 is not below"):
        _train(tiny_paths, tmp_path / "again", max_steps=4, probe_steps=4)


def test_probe_weight_keeps_the_probe_beside_the_qa_loss(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path, max_steps=4, probe_steps=2, probe_weight=0.5)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    for r in records[2:]:
        assert r["qa"] > 0 and r["probe"] > 0
        assert r["loss"] == pytest.approx(r["qa"] + 0.5 * r["probe"] + r["vq"], rel=1e-5)
    with pytest.raises(MBCError, match="probe_weight"):
        _train(tiny_paths, tmp_path / "again", probe_weight=-1.0)


# ---- a run that is interrupted or killed loses at most what its last save did not hold -----------

INTERRUPTIBLE = dict(warmup_ratio=0.0, eval_questions=2)  # warmup would depend on max_steps


def _start_and_signal(tiny_paths, out, signum, **overrides) -> tuple[subprocess.CompletedProcess, int]:
    """Start a long run in its own process, send ``signum`` once it has logged 3 steps; the saved step."""
    script = Path(__file__).parent / "training_to_interrupt.py"
    values = json.dumps(_values(out, **INTERRUPTIBLE, max_steps=100_000, **overrides))
    process = subprocess.Popen(
        [sys.executable, str(script), json.dumps(tiny_paths), values], stderr=subprocess.PIPE, text=True
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, "", stderr), saved_progress(out / "last")[
        "step"
    ]


def _same_weights(first: Path, second: Path) -> None:
    a, b = load_file(first / WEIGHTS_NAME), load_file(second / WEIGHTS_NAME)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_sigint_saves_the_run_and_the_same_command_continues_it(tiny_paths, tmp_path):
    out = tmp_path / "interrupted"
    result, saved = _start_and_signal(tiny_paths, out, signal.SIGINT, save_every_minutes=60)
    assert result.returncode == 130, result.stderr[-2000:]
    assert f"interrupted by SIGINT at step {saved} of 100000" in result.stderr
    assert saved >= 3
    _train(tiny_paths, out, **INTERRUPTIBLE, max_steps=saved + 2)  # continued
    _train(tiny_paths, tmp_path / "straight", **INTERRUPTIBLE, max_steps=saved + 2)
    _same_weights(out / "last", tmp_path / "straight" / "last")


def test_a_killed_run_continues_from_its_last_periodic_save(tiny_paths, tmp_path):
    out = tmp_path / "killed"
    result, saved = _start_and_signal(tiny_paths, out, signal.SIGKILL, save_every_minutes=0.0)  # save every step
    assert result.returncode == -signal.SIGKILL
    assert saved >= 1
    _train(tiny_paths, out, **INTERRUPTIBLE, max_steps=saved + 2)
    _train(tiny_paths, tmp_path / "straight", **INTERRUPTIBLE, max_steps=saved + 2)
    _same_weights(out / "last", tmp_path / "straight" / "last")


def test_resuming_with_other_settings_or_data_is_refused(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path, max_steps=2)
    with pytest.raises(MBCError, match=r"other settings \(saved -> now\): learning_rate 0.003 -> 0.01"):
        _train(tiny_paths, tmp_path, max_steps=4, learning_rate=1e-2)
    with pytest.raises(MBCError, match="num_slots 4 -> 6"):
        _train(tiny_paths, tmp_path, {"num_slots": 6}, max_steps=4)
    config = tiny_config(tiny_paths, "gpt2", "bert", lora_dropout=0.0)
    with pytest.raises(MBCError, match="training rows"):
        train(config, TrainConfig(**_values(tmp_path, max_steps=4)), ROWS["train"][1:], ROWS["validation"])
    _train(tiny_paths, tmp_path, max_steps=3, log_every=1, eval_questions=2)  # these may change


def test_rerunning_a_finished_run_trains_no_further(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path, max_steps=3)
    before = load_file(tmp_path / "last" / WEIGHTS_NAME)
    _train(tiny_paths, tmp_path, max_steps=3)
    assert saved_progress(tmp_path / "last")["step"] == 3
    after = load_file(tmp_path / "last" / WEIGHTS_NAME)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_mac_started_from_a_mbc_float_memory_state_computes_what_mbc_did(tiny_paths, tmp_path):
    # Until its codebook is fitted MBC computes what MAC does: a MAC run started from MBC's state at
    # step 1 reaches, at step 3, the weights a MBC run with 3 float-memory steps keeps at its step 3.
    _train(tiny_paths, tmp_path / "mbc1", max_steps=4, float_memory_steps=1, keep_float_memory_state=True)
    _train(tiny_paths, tmp_path / "mbc3", max_steps=4, float_memory_steps=3, keep_float_memory_state=True)
    assert saved_progress(tmp_path / "mbc3" / "float-memory")["step"] == 3
    mac = tiny_config(tiny_paths, "gpt2", "bert", lora_dropout=0.0, quantize=False)
    settings = TrainConfig(**_values(tmp_path / "mac", max_steps=3, float_memory_steps=1, eval_questions=0))
    metrics = train(mac, settings, ROWS["train"], ROWS["validation"], start_from=tmp_path / "mbc1" / "float-memory")
    assert metrics == {}  # eval_questions=0: no validation
    records = [json.loads(line) for line in (tmp_path / "mac" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 3]
    assert not [r for r in records if r["kind"] == "validation"]
    branched = load_file(tmp_path / "mac" / "last" / WEIGHTS_NAME)
    straight = load_file(tmp_path / "mbc3" / "float-memory" / WEIGHTS_NAME)
    assert set(straight) - set(branched) == {n for n in straight if n.startswith("quantizer.")}
    for name in branched:
        assert torch.allclose(branched[name], straight[name], atol=1e-6), name
    start = load_file(tmp_path / "mbc1" / "float-memory" / WEIGHTS_NAME)
    assert any(not torch.allclose(branched[name], start[name]) for name in branched)  # it did train


def test_only_mac_starts_from_a_float_memory_state_with_the_same_settings(tiny_paths, tmp_path):
    _train(tiny_paths, tmp_path / "mbc", max_steps=3, float_memory_steps=1, keep_float_memory_state=True)
    start = tmp_path / "mbc" / "float-memory"

    def start_mac(quantize=False, **overrides):
        config = tiny_config(tiny_paths, "gpt2", "bert", lora_dropout=0.0, quantize=quantize)
        settings = TrainConfig(**_values(tmp_path / "mac", max_steps=3, float_memory_steps=1, **overrides))
        train(config, settings, ROWS["train"], ROWS["validation"], start_from=start)

    with pytest.raises(MBCError, match="only a MAC run"):
        start_mac(quantize=True)
    with pytest.raises(MBCError, match="learning_rate 0.003 -> 0.01"):
        start_mac(learning_rate=1e-2)
    with pytest.raises(MBCError, match="holds no float-memory state"):
        start = tmp_path / "nowhere"
        start_mac()

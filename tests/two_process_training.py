"""Run by test_train.py under `accelerate launch --num_processes 2`: trains a tiny MBC a few steps
and writes each process's final trainable weights, so the test can compare them."""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

import mbc.training.trainer as training  # noqa: E402
from mbc.data import split_by_group  # noqa: E402
from mbc.data.generated import generate_examples  # noqa: E402

paths, out = json.loads(sys.argv[1]), Path(sys.argv[2])
rows = split_by_group(generate_examples(30, seed=1), {"train": 0.8, "validation": 0.2})
state = PartialState(cpu=True)  # two CPU processes in one gloo group
captured = {}
original_build = training.MBCModel.build


def build_and_capture(config):
    model = original_build(config)
    captured["model"] = model
    if state.is_main_process:
        save_file(model.trainable_state_dict(), out / "initial.safetensors")
    return model


training.MBCModel.build = build_and_capture
config = training.TrainConfig(
    output_dir=str(out / "run"),
    batch_size=2,
    learning_rate=3e-3,
    max_steps=4,
    max_minutes=30,
    eval_every=1000,
    eval_questions=4,
    grad_accumulation=2,
    seed=0,
)
training.train(tiny_config(paths, "llama", "bert", lora_dropout=0.0), config, rows["train"], rows["validation"])
save_file(captured["model"].trainable_state_dict(), out / f"rank{state.process_index}.safetensors")

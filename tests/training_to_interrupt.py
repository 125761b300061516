"""Run by test_train.py in its own process, to be sent SIGINT or SIGKILL mid-run: trains the tiny
model with the training settings given as JSON, exiting as `mbc train` does."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402
from test_train import ROWS  # noqa: E402

from mbc.errors import MBCError  # noqa: E402
from mbc.training.trainer import TrainConfig, train  # noqa: E402

paths, values = json.loads(sys.argv[1]), json.loads(sys.argv[2])
try:
    train(
        tiny_config(paths, "gpt2", "bert", lora_dropout=0.0), TrainConfig(**values), ROWS["train"], ROWS["validation"]
    )
except MBCError as error:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(getattr(error, "exit_code", 2))

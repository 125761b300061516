"""What saving a resumable training state costs at the cpu preset: seconds and bytes on disk.

    .venv/bin/python bench/save.py [--repeats 3]

Builds the cpu preset's model (bundled SmolLM2 + MiniLM), takes one Adam step on generated rows so
that the optimizer holds its moments, then writes ``last/`` as training does (model tensors,
optimizer and scheduler state, each file fsynced, the folder swapped in whole) ``--repeats`` times,
and loads it back once. Training saves every ``save_every_minutes`` (default 5): the overhead is
the save time over that interval.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import get_scheduler

from mbc import MBCConfig, MBCModel, checkpoint
from mbc.data.generated import generate_examples
from mbc.presets import preset
from mbc.training.state import load_training_state, save_training_state
from mbc.training.trainer import TrainConfig, parameter_groups


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    chosen = preset("cpu")
    model = MBCModel.build(MBCConfig(**{**chosen["model"], "retrieval_top_k": 0}))
    optimizer = torch.optim.Adam(parameter_groups(model, TrainConfig(**chosen["train"])))
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=0, num_training_steps=10)
    rows = generate_examples(10)[:4]
    model(
        [r.document for r in rows], [r.question for r in rows], [r.answers[0] for r in rows], [0, 1, 2, 3]
    ).loss.backward()
    optimizer.step()
    progress = {"step": 1, "epoch": 0, "batch": 1}
    with tempfile.TemporaryDirectory(dir=".") as folder:
        last = Path(folder) / "last"
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with checkpoint.replacing(last) as partial:
                checkpoint.write(model, partial)
                save_training_state(partial, optimizer, scheduler, progress)
            seconds.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in last.iterdir())
        start = time.perf_counter()
        model.load_trainable_state(last)
        load_training_state(last, optimizer, scheduler)
        loading = time.perf_counter() - start
    median = sorted(seconds)[len(seconds) // 2]
    print(f"save last/: median {median:.2f} s over {args.repeats} (all: {', '.join(f'{s:.2f}' for s in seconds)})")
    print(f"on disk: {size / 1e6:.0f} MB (model tensors + optimizer moments + RNG and progress)")
    print(f"load it back: {loading:.2f} s")
    print(f"overhead at save_every_minutes=5: {100 * median / 300:.2f}% of training time")


if __name__ == "__main__":
    main()

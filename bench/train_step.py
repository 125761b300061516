"""Seconds per training step and peak memory, CPU preset and DistilGPT2 preset, side by side.

    .venv/bin/python bench/train_step.py [--batch 4] [--steps 5] [--data PATH]

Each preset runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own.
The DistilGPT2 preset uses a DistilGPT2-shaped GPT-2 (6 layers, 768 wide, 12 heads) and two
t5-small-shaped T5 encoders (6+6 layers, 512 wide) at random weights (speed does not depend on the
weights), with the SmolLM2 and MiniLM tokenizers standing in for GPT-2's and T5's. A step is
forward + backward + Adam update on one batch of SQuAD rows (the shared open subset when present,
else generated documents). The reference implementation, measured on this machine at the
DistilGPT2 preset and batch 4: 49 s per forward+backward, 11.1 GB peak (the authors' code measured on this machine, issue 4).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from shapes import distilgpt2_shaped_model, save_distilgpt2_shaped_backbones

REFERENCE = {"seconds": 49.0, "peak_gb": 11.1}
SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "squad-v1.1-dev-open.json"


def _rows(data: str | None, count: int):
    from mbc import data as qa_data

    spec = data or (str(SQUAD) if SQUAD.exists() else "generated")
    rows = qa_data.load(spec)
    return spec, rows[:: max(1, len(rows) // (count * 50))][: count * 50]


def _cpu_preset_model():
    from mbc import MBCConfig, MBCModel
    from mbc.training.presets import preset

    return MBCModel.build(MBCConfig(**preset("cpu")["model"]))


def measure(
    name: str, batch: int, steps: int, data: str | None, backbones: str | None, glibc_default: bool = False
) -> dict:
    import torch

    from mbc.training.allocator import keep_large_allocations_on_mmap
    from mbc.training.presets import preset

    if preset(name)["train"].get("return_freed_memory") and not glibc_default:
        keep_large_allocations_on_mmap()  # as mbc.train does for this preset
    torch.manual_seed(0)
    model = (_cpu_preset_model() if name == "cpu" else distilgpt2_shaped_model(Path(backbones))).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    spec, rows = _rows(data, batch * (steps + 1))
    times = []
    for step in range(steps + 1):  # the first step warms up (allocations, one-off setup) and is not timed
        chunk = rows[step * batch : (step + 1) * batch]
        start = time.perf_counter()
        documents = list(dict.fromkeys(r.document for r in chunk))
        out = model(
            documents,
            [r.question for r in chunk],
            [r.answers[0] for r in chunk],
            question_documents=[documents.index(r.document) for r in chunk],
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    counts = model.parameter_counts()
    return {
        "preset": name + (" (glibc default allocator)" if glibc_default else ""),
        "batch": batch,
        "data": spec,
        "seconds_per_step": sum(times[1:]) / steps,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "trainable_parameters": counts["trainable"],
        "frozen_parameters": counts["frozen"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--data", default=None)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one preset in this process
    parser.add_argument("--backbones", default=None, help=argparse.SUPPRESS)  # internal: the random backbones' folder
    parser.add_argument(
        "--glibc-default", action="store_true", help=argparse.SUPPRESS
    )  # internal: leave malloc's threshold alone
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.batch, args.steps, args.data, args.backbones, args.glibc_default)))
        return
    backbones = save_distilgpt2_shaped_backbones()
    results = []
    # The last run shows what mbc.allocator saves: the same preset with glibc's default threshold.
    for name, glibc_default in (("cpu", False), ("distilgpt2", False), ("distilgpt2", True)):
        command = [
            sys.executable,
            __file__,
            "--only",
            name,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--backbones",
            str(backbones),
        ] + (["--glibc-default"] if glibc_default else [])
        if args.data:
            command += ["--data", args.data]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    print(f"{'preset':<44}{'batch':>6}{'s/step':>10}{'peak GB':>10}{'trainable':>14}   vs reference (49 s, 11.1 GB)")
    for r in results:
        print(
            f"{r['preset']:<44}{r['batch']:>6}{r['seconds_per_step']:>10.2f}{r['peak_gb']:>10.2f}{r['trainable_parameters']:>14,}"
            f"   {REFERENCE['seconds'] / r['seconds_per_step']:.1f}x faster, "
            f"{r['peak_gb'] / REFERENCE['peak_gb']:.0%} of its memory"
        )
    print(f"data: {results[0]['data']}")


if __name__ == "__main__":
    main()

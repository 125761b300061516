"""Seconds per step of the token memory's reader training (``train_reader``) in float32 and under
bf16 autocast, side by side, and how far the two losses part.

    .venv/bin/python bench/reader_step.py [--steps 12] [--repeats 2] [--data PATH]

Each precision runs in its own subprocess, alternating, on the same SQuAD training rows (every row
new, as in a reader's first epoch: the frozen lower layers run for each) with each document's first
96 tokens as its kept tokens. bf16 autocast is fast where the CPU has bf16 matrix units (AMX) and
slow where oneDNN emulates them; the script prints what this CPU has.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "squad-v1.1-dev-open.json"


def measure(precision: str, steps: int, data: str) -> dict:
    import torch

    from mbc import data as qa_data
    from mbc.token_memory import TokenMemory
    from mbc.training.token_memory import train_reader

    torch.manual_seed(0)
    model = TokenMemory.build()
    rows = qa_data.load_splits(data)["train"][: 8 * steps]
    texts = list(dict.fromkeys(r.document for r in rows))
    kept = {t: model.llm.tokenizer.decode(model.llm.tokenizer(t)["input_ids"][:96]) for t in texts}
    start = time.perf_counter()
    losses = train_reader(model, rows, steps, kept_texts=kept, mixed_precision=precision)
    return {"precision": precision, "seconds_per_step": (time.perf_counter() - start) / steps, "losses": losses}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default=str(SQUAD))
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one precision
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.steps, args.data)))
        return
    import torch

    results = []
    for _ in range(args.repeats):
        for precision in ("no", "bf16"):
            command = [sys.executable, __file__, "--only", precision, "--steps", str(args.steps), "--data", args.data]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AMX tiles: {amx}; {args.steps} steps of 8 rows")
    for r in results:
        print(f"{'float32' if r['precision'] == 'no' else 'bf16 autocast':<15}{r['seconds_per_step']:>8.2f} s/step")
    mean = {
        p: sum(r["seconds_per_step"] for r in results if r["precision"] == p) / args.repeats for p in ("no", "bf16")
    }
    print(f"bf16 autocast: {mean['no'] / mean['bf16']:.2f}x the steps per second of float32")
    pair = [next(r["losses"] for r in results if r["precision"] == p) for p in ("no", "bf16")]
    print("loss per step, float32 / bf16: " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(*pair)))


if __name__ == "__main__":
    main()

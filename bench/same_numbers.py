"""Does a change keep every number? Short runs at an earlier commit and at the working tree, compared.

    .venv/bin/python bench/same_numbers.py REV [--output runs/same-numbers]

For a change meant to alter no behaviour (a refactoring): the same seeds must give the same numbers.
Both trees (REV, checked out as a temporary git worktree, and this working tree) run, with this
environment's packages and one after the other:

- three 14-step training runs on generated documents, logging every step: the ``cpu`` preset
  (retrieval keys, probe and float-memory warm starts, validation through the codebook), MAC, and
  the preset without retrieval keys with a bank curriculum and backprop dropout;
- a token memory (``mbc train-tokens``: its scorer, its retrieval keys and 4 steps of its reader);
- ``mbc validate`` of the first run's checkpoint, and ``mbc eval`` of it with the MAC checkpoint and
  the token memory.

It prints, for each, whether every logged loss and metric (times and memory left out) and every prediction
is identical, and the first difference where one is not.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "generated:0:400"
TRAIN = [
    "--preset",
    "cpu",
    "--data",
    DATA,
    "--max-steps",
    "14",
    *[
        x
        for s in (
            "probe_steps=4",
            "teach_reading_steps=2",
            "float_memory_steps=2",
            "eval_every=7",
            "eval_questions=24",
            "log_every=1",
            "codebook_fit_documents=200",
            "save_best=false",
        )
        for x in ("--train-set", s)
    ],
]
RUNS = {
    "mbc": [],
    "mac": ["--set", "quantize=false"],
    "no retrieval keys": [
        "--set",
        "retrieval_top_k=0",
        "--train-set",
        "bank_curriculum_steps=8",
        "--train-set",
        "backprop_keep=0.5",
    ],
}


def run_all(tree: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}

    def mbc(*args: str, log: str) -> None:
        with (out / log).open("w") as f:
            subprocess.run(
                [sys.executable, "-m", "mbc.cli", *args],
                env=env,
                cwd=tree,
                stdout=f,
                stderr=subprocess.STDOUT,
                check=True,
            )

    out.mkdir(parents=True, exist_ok=True)
    for name, extra in RUNS.items():
        print(f"{tree}: training '{name}'", flush=True)
        mbc("train", *TRAIN, "--output", str(out / name), *extra, log=f"{name}.log")
    print(f"{tree}: fitting the token memory", flush=True)
    mbc(
        "train-tokens",
        *("--data", DATA, "--output", str(out / "tokens"), "--keep", "16"),
        *("--reader-steps", "4"),
        log="tokens.log",
    )
    mbc(
        "validate",
        str(out / "mbc" / "last"),
        "--data",
        DATA,
        "--questions",
        "24",
        "--output",
        str(out / "validate.json"),
        log="validate.log",
    )
    mbc(
        "eval",
        str(out / "mbc" / "last"),
        "--mac",
        str(out / "mac" / "last"),
        "--tokens",
        str(out / "tokens"),
        "--data",
        DATA,
        "--documents",
        "8",
        "--retention-every",
        "4",
        "--output",
        str(out / "eval"),
        log="eval.log",
    )


# what a run measures of the machine rather than computes: times and resident memory
MEASURED = ("answer_ms_per_question", "adapt_ms_per_document", "adapt_peak_mb")


def _records(path: Path) -> list[dict]:
    timing = ("rows_per_second", "seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in path.read_text().splitlines()]


def _first_difference(before: list, after: list) -> str:
    if len(before) != len(after):
        return f"{len(before)} records before, {len(after)} after"
    return next(f"before {b}\n      after  {a}" for b, a in zip(before, after) if b != a)


def compare(before: Path, after: Path) -> bool:
    same_everywhere = True
    pairs = {
        f"training '{name}', metrics.jsonl": (
            _records(before / name / "metrics.jsonl"),
            _records(after / name / "metrics.jsonl"),
        )
        for name in RUNS
    }
    pairs["mbc validate"] = tuple(json.loads((d / "validate.json").read_text())["results"] for d in (before, after))
    pairs["mbc eval, predictions.csv"] = tuple(
        list(csv.reader((d / "eval" / "predictions.csv").open())) for d in (before, after)
    )
    pairs["mbc eval, scores"] = tuple(
        {
            m: {k: v for k, v in s.items() if k not in MEASURED}
            for m, s in json.loads((d / "eval" / "summary.json").read_text())["methods"].items()
        }
        for d in (before, after)
    )
    for label, (b, a) in pairs.items():
        same = b == a
        same_everywhere &= same
        print(f"{label}: {'identical' if same else 'DIFFERENT'} ({len(a)} records)")
        if not same:
            print(
                "      "
                + _first_difference(list(b) if isinstance(b, list) else [b], list(a) if isinstance(a, list) else [a])
            )
    final = _records(after / "mbc" / "metrics.jsonl")
    train, validation = (
        [r for r in final if r["kind"] == "train"][-1],
        [r for r in final if r["kind"] == "validation"][-1],
    )
    print(
        f"e.g. 'mbc' at step {train['step']}: training loss {train['loss']!r}, validation QA loss {validation['loss']!r}"
    )
    return same_everywhere


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the commit to compare with (e.g. the one before a refactoring)")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "same-numbers")
    args = parser.parse_args()
    args.output = args.output.resolve()  # the runs' working folder is each tree, not this one
    worktree = Path(tempfile.mkdtemp(prefix="mbc-rev-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.rev],
        check=True,
        capture_output=True,
    )
    try:
        run_all(worktree, args.output / "before")
        run_all(ROOT, args.output / "after")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    same = compare(args.output / "before", args.output / "after")
    print(f"{args.rev} against the working tree: {'the same numbers' if same else 'NUMBERS CHANGED'}")


if __name__ == "__main__":
    main()

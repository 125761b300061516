"""Online adaptation at the DistilGPT2 preset: adapting, answering, bytes on disk, and how answering
time grows with the bank, for MBC (code-count reading) and MAC (top-k + windowed reading).

    .venv/bin/python bench/adapt.py [--documents 100] [--questions 20] [--beam-questions 5] [--large 100000]

Weights are random (bench/shapes.py): time and memory do not depend on them. Each part runs in its
own subprocess so that its peak resident memory is its own:

- adapt:  the first N distinct SQuAD documents (the shared open subset when present, else
          generated ones) compressed and appended to a fresh SQLite bank, in batches of 16;
- answer: questions about those documents answered one at a time (batch 1, modulation included),
          greedy and with the paper's diverse beam search (12 beams, 4 groups);
- scale:  time per question (greedy, 16 new tokens) from a bank of 1,000 and of ``--large``
          documents. The entries are random codes (MBC) or random vectors (MAC) written straight
          into the bank: what a question costs does not depend on how the entries were made.

Reference implementation, measured on this machine at this preset (issue 4):
8,307 ms per distinct document to adapt, 2,307 ms per question greedy, 7,394 ms with diverse beam
search, 96 bytes per question row (~995 per distinct document), 3.7 GB peak while adapting.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shapes import distilgpt2_shaped_model, save_distilgpt2_shaped_backbones

REFERENCE = {"adapt_ms": 8307, "greedy_ms": 2307, "beam_ms": 7394, "bytes_per_document": 995, "adapt_peak_gb": 3.7}
TARGET = {
    "adapt_ms": 830,
    "greedy_ms": 770,
    "beam_ms": REFERENCE["beam_ms"] / 3,
    "bytes_per_document": 16,
    "adapt_peak_gb": 1.5,
}
SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "squad-v1.1-dev-open.json"


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _rows(count: int):
    from mbc import data as qa_data

    spec = str(SQUAD) if SQUAD.exists() else "generated"
    return spec, qa_data.first_documents(qa_data.load(spec), count)


def _model(backbones: str, **overrides):
    import torch

    torch.manual_seed(0)  # the same random weights (and codebook) in every part
    return distilgpt2_shaped_model(Path(backbones), **overrides).eval()


def part_adapt(args) -> dict:
    from mbc import data as qa_data
    from mbc.bank import BankLayout, MemoryBank
    from mbc.memory.ingest import ingest

    model = _model(args.backbones)
    spec, rows = _rows(args.documents)
    texts = qa_data.documents(rows)
    model.compress(texts[:2])  # warm-up: one-off allocations
    with MemoryBank.open(args.bank, BankLayout.of(model)) as bank:
        start = time.perf_counter()
        ingest(model, bank, texts, batch_size=16)
        seconds = time.perf_counter() - start
        sizes = bank.sizes()
    return {
        "data": spec,
        "documents": len(texts),
        "questions": len(rows),
        "adapt_ms": 1000 * seconds / len(texts),
        "documents_per_second": len(texts) / seconds,
        "bytes_per_document": sizes["stored_bytes"] / sizes["documents"],
        "file_bytes": sizes["file_bytes"],
        "adapt_peak_gb": _peak_gb(),
    }


def _time_questions(model, reader, questions: list[str], decoding) -> float:
    from mbc.memory.readers import answer_from_bank

    answer_from_bank(model, reader, questions[:1], decoding)  # warm-up
    start = time.perf_counter()
    for question in questions:
        answer_from_bank(model, reader, [question], decoding)
    return 1000 * (time.perf_counter() - start) / len(questions)


def part_answer(args) -> dict:
    from mbc.bank import BankLayout, MemoryBank
    from mbc.memory.readers import reader_for
    from mbc.network.decoding import DecodingConfig

    model = _model(args.backbones)
    _, rows = _rows(args.documents)
    questions = [r.question for r in rows]
    with MemoryBank.open(args.bank, BankLayout.of(model)) as bank:
        reader = reader_for(model, bank)
        greedy = _time_questions(model, reader, questions[: args.questions], DecodingConfig("greedy"))
        beam = _time_questions(model, reader, questions[: args.beam_questions], DecodingConfig("diverse_beam"))
    return {"greedy_ms": greedy, "beam_ms": beam, "answer_peak_gb": _peak_gb()}


def _fill(bank, count: int, seed: int) -> float:
    """Append ``count`` random entries; returns documents per second."""
    import numpy as np

    rng = np.random.default_rng(seed)
    layout, start, step = bank.layout, time.perf_counter(), 1000
    for first in range(0, count, step):
        n = min(step, count - first)
        if layout.mode == "mbc":
            entries = rng.integers(0, layout.codebook_size, (n, *layout.entry_shape)).astype(np.uint16)
        else:
            entries = rng.standard_normal((n, *layout.entry_shape), dtype=np.float32)
        bank.add([f"random document {seed}-{first + i}" for i in range(n)], entries)
    return count / (time.perf_counter() - start)


def part_scale(args) -> dict:
    from mbc.bank import BankLayout, MemoryBank
    from mbc.memory.readers import reader_for
    from mbc.network.decoding import DecodingConfig

    model = _model(args.backbones, quantize=args.mode == "mbc")
    _, rows = _rows(args.documents)
    questions = [r.question for r in rows][: args.questions]
    results = {}
    folder = Path(tempfile.mkdtemp(prefix="mbc-scale-"))
    for size in (1000, args.large):
        path = folder / f"{args.mode}-{size}.db"
        with MemoryBank.open(path, BankLayout.of(model)) as bank:
            rate = _fill(bank, size, seed=size)
            reader = reader_for(model, bank)
            start = time.perf_counter()
            reader.modulation(questions[:1])  # the reader's one-off look at the bank (incremental afterwards)
            prepare = time.perf_counter() - start
            ms = _time_questions(model, reader, questions, DecodingConfig("greedy"))
            results[size] = {
                "ms_per_question": ms,
                "reader_setup_s": prepare,
                "fill_documents_per_second": rate,
                "file_bytes": bank.sizes()["file_bytes"],
            }
        for file in folder.glob(path.name + "*"):
            file.unlink()
    return {"mode": args.mode, "sizes": results, "peak_gb": _peak_gb()}


def _run(part: str, args, **extra) -> dict:
    command = [
        sys.executable,
        __file__,
        "--part",
        part,
        "--backbones",
        args.backbones,
        "--documents",
        str(args.documents),
        "--questions",
        str(args.questions),
        "--beam-questions",
        str(args.beam_questions),
        "--large",
        str(args.large),
        "--bank",
        args.bank,
    ] + [x for k, v in extra.items() for x in (f"--{k}", str(v))]
    output = subprocess.run(command, capture_output=True, text=True)
    if output.returncode != 0:
        sys.exit(f"part {part} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=100)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--beam-questions", type=int, default=5)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backbones", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bank", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="mbc", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps({"adapt": part_adapt, "answer": part_answer, "scale": part_scale}[args.part](args)))
        return
    args.backbones = str(save_distilgpt2_shaped_backbones())
    args.bank = str(Path(tempfile.mkdtemp(prefix="mbc-adapt-")) / "bank.db")
    adapt, answer = _run("adapt", args), _run("answer", args)
    scale = {mode: _run("scale", args, mode=mode) for mode in ("mbc", "mac")}
    figures = {**adapt, **answer}
    print(f"DistilGPT2 preset (random weights), {adapt['documents']} distinct documents of {adapt['data']}")
    print(f"{'figure':<34}{'this':>12}{'reference':>12}{'target':>12}   ratio to reference")
    for key, label, lower in (
        ("adapt_ms", "adapt, ms per document", True),
        ("greedy_ms", "answer greedy, ms per question", True),
        ("beam_ms", "answer diverse beam, ms per question", True),
        ("bytes_per_document", "bytes per document on disk", True),
        ("adapt_peak_gb", "peak GB while adapting", True),
    ):
        value, reference, target = figures[key], REFERENCE[key], TARGET[key]
        met = "meets" if value <= target else "MISSES"
        print(
            f"{label:<34}{value:>12,.1f}{reference:>12,.1f}{target:>12,.1f}   {reference / value:.1f}x less ({met} target)"
        )
    print(f"documents per second ingested (with compression): {adapt['documents_per_second']:.1f}")
    for mode, result in scale.items():
        small, large = result["sizes"]["1000"], result["sizes"][str(args.large)]
        ratio = large["ms_per_question"] / small["ms_per_question"]
        print(
            f"{mode.upper()} answering, greedy: {small['ms_per_question']:.0f} ms/question with 1,000 documents, "
            f"{large['ms_per_question']:.0f} ms with {args.large:,} ({ratio:.2f}x; target <= 2x); reader set-up "
            f"{small['reader_setup_s']:.2f} s and {large['reader_setup_s']:.2f} s once; random entries appended at "
            f"{large['fill_documents_per_second']:,.0f} documents/s; file {large['file_bytes'] / 1e6:,.1f} MB"
        )


if __name__ == "__main__":
    main()

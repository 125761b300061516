"""Training examples per second and peak memory, CPU preset and DistilGPT2 preset, with and
without what training keeps of frozen work, side by side.

    .venv/bin/python bench/train_step.py [--batch 8] [--batches 6] [--presets cpu,distilgpt2] [--repeats 1] [--data PATH]
                                         [--variants 0,1,...]   # positions in VARIANTS

Each variant runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own,
through the trainer's own step (StepObjective, the trainer's optimizer, the schedule's QA step):
- ``before``: Adam's per-tensor loop, every layer of the frozen LLM run in every step (the code of 2026-12-01);
- ``fused Adam``: the trainer's optimizer, nothing cached;
- ``fused Adam + cache``: also the frozen LLM layers' hidden states per row (training/activations.py),
  timed over a second epoch of the same batches (the first fills the cache, as epoch 1 of a run does);
- ``..., encoders' top N train``: and only the top N of each encoder's layers train
  (``encoder_trained_layers=N``; 0, the cpu preset's since 2026-12-02: only the reader blocks above
  the encoder), the layers below kept per text. The other variants train the encoders whole;
- ``..., gap``: and every step also measures the reading gap (a forward with each question
  reading another document; ``gap_every=5`` in the cpu preset measures it every fifth step).
Every variant times the same ``--batches`` batches after one untimed warm-up batch. The DistilGPT2
preset puts a prefix in every layer, so nothing lies below it to cache. It uses a DistilGPT2-shaped
GPT-2 and two t5-small-shaped T5 encoders at random weights (bench/shapes.py). The reference
implementation, measured on this machine at the DistilGPT2 preset and batch 4: 49 s per
forward+backward, 11.1 GB peak (the authors' code measured on this machine, issue 4).
"""

from __future__ import annotations

import argparse
import json
import random
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
    # Shuffled as the trainer's batches are: nearly every row of a batch has a document of its own.
    return spec, random.Random(0).sample(rows, count)


def _cpu_preset_model(**overrides):
    from mbc import MBCConfig, MBCModel
    from mbc.presets import preset

    return MBCModel.build(MBCConfig(**{**preset("cpu")["model"], **overrides}))


VARIANTS = (
    "before",
    "fused Adam",
    "fused Adam + cache",
    "fused Adam + cache, encoders' top 2 train",  # of MiniLM's 6 layers
    "fused Adam + cache, encoders' top 0 train",  # the encoders frozen but for their reader blocks
    # and the reading gap measured in every step (TrainConfig.gap_every=1; the cpu preset's is 5)
    "fused Adam + cache, encoders' top 0 train, gap",
    # and the step under bf16 autocast (TrainConfig.mixed_precision="bf16"): fast where the CPU
    # has bf16 matrix units (AMX), slow where oneDNN emulates them
    "fused Adam + cache, encoders' top 0 train, bf16",
)


def measure(name: str, variant: str, batch: int, batches: int, data: str | None, backbones: str | None) -> dict:
    import torch

    from mbc.presets import preset
    from mbc.training.activations import FrozenActivations
    from mbc.training.allocator import keep_large_allocations_on_mmap
    from mbc.training.objectives import StepObjective
    from mbc.training.schedule import Step
    from mbc.training.trainer import TrainConfig, make_optimizer, parameter_groups

    train = TrainConfig(**preset(name)["train"])
    if train.return_freed_memory:
        keep_large_allocations_on_mmap()  # as mbc.train does for this preset
    torch.manual_seed(0)
    # The encoders train whole unless the variant says otherwise (the cpu preset now freezes them).
    overrides = {"encoder_trained_layers": int(variant.split("top ")[1][0]) if "top" in variant else None}
    model = (
        _cpu_preset_model(**overrides) if name == "cpu" else distilgpt2_shaped_model(Path(backbones), **overrides)
    ).train()
    if model.retrieval_keys is not None:
        # centroids need as many documents as codes; with top-1 a training step reads each row's own document
        model.retrieval_keys.fit([f"document {i}" for i in range(model.config.retrieval_codes)])
    if variant == "before":
        optimizer = torch.optim.Adam(parameter_groups(model, train), lr=train.learning_rate)
    else:
        optimizer = make_optimizer(model, train)
    cache = FrozenActivations(model) if "cache" in variant else None
    objective = StepObjective(model, cache)
    spec, rows = _rows(data, batch * (batches + 1))
    chunks = [rows[i * batch : (i + 1) * batch] for i in range(batches + 1)]

    def step(chunk) -> float:
        start = time.perf_counter()
        documents = list(dict.fromkeys(r.document for r in chunk))
        own = [documents.index(r.document) for r in chunk]
        questions, answers = [r.question for r in chunk], [r.answers[0] for r in chunk]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.endswith("bf16")):
            out = objective(documents, questions, answers, own, Step(measure_gap=variant.endswith("gap")))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    epochs = 2 if cache is not None else 1
    for _ in range(epochs - 1):
        for chunk in chunks:
            step(chunk)
    step(chunks[0])  # warm-up: allocations, one-off setup
    seconds = sum(step(chunk) for chunk in chunks[1:])
    counts = model.parameter_counts()
    sizes = cache.sizes() if cache is not None else {}
    cached = {part: size / max(rows, 1) for part, (rows, size) in sizes.items()}
    return {
        "preset": name,
        "variant": variant + ("" if cache is None or cache.enabled else " (nothing below to keep)"),
        "batch": batch,
        "data": spec,
        "examples_per_second": batch * batches / seconds,
        "seconds_per_step": seconds / batches,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "cache_bytes_per_row": cached,
        "trainable_parameters": counts["trainable"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--data", default=None)
    parser.add_argument("--presets", default="cpu,distilgpt2", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over every variant, alternating")
    parser.add_argument("--variants", default=None, help="positions in VARIANTS, comma-separated (default: all)")
    parser.add_argument("--only", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: one preset and variant
    parser.add_argument("--backbones", default=None, help=argparse.SUPPRESS)  # internal: the random backbones' folder
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(*args.only, args.batch, args.batches, args.data, args.backbones)))
        return
    backbones = save_distilgpt2_shaped_backbones()
    results = []
    variants = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    reference = variants[0]  # each preset's first round of it is what the others are compared with
    compared = "vs before" if reference == "before" else "vs first"
    rounds = [(name, variant) for _ in range(args.repeats) for name in args.presets.split(",") for variant in variants]
    for name, variant in rounds:
        command = [sys.executable, __file__, "--only", name, variant, "--batch", str(args.batch)]
        command += ["--batches", str(args.batches), "--backbones", str(backbones)]
        if args.data:
            command += ["--data", args.data]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    print(
        f"{'preset':<12}{'variant':<50}{'batch':>6}{'ex/s':>8}{'s/step':>8}{compared:>11}{'peak GB':>9}"
        "  kept per row / text"
    )
    for r in results:
        before = next(b for b in results if b["preset"] == r["preset"] and b["variant"].startswith(reference))
        kept = ", ".join(f"{part} {size / 1024:.0f} KB" for part, size in r["cache_bytes_per_row"].items()) or "-"
        print(
            f"{r['preset']:<12}{r['variant']:<50}{r['batch']:>6}{r['examples_per_second']:>8.2f}"
            f"{r['seconds_per_step']:>8.2f}{r['examples_per_second'] / before['examples_per_second']:>10.2f}x"
            f"{r['peak_gb']:>9.2f}  {kept}"
        )
    distil = [r for r in results if r["preset"] == "distilgpt2"]
    if distil:
        best = min(r["seconds_per_step"] for r in distil)
        print(
            f"distilgpt2 at batch {args.batch}: {best:.2f} s/step; the reference: {REFERENCE['seconds']:.0f} s at batch 4"
        )
    print(f"data: {results[0]['data']}")


if __name__ == "__main__":
    main()

"""The bytes-accuracy frontier: MBC at several sizes of memory per document, each with its own
documents and with unrelated ones, against MAC, the token memory (token_memory.py) at several K,
BM25 top-1 (the text in the prompt) and the text itself, raw and zstd-compressed.

    .venv/bin/python bench/frontier.py train [--points NAME,...]   # trains each point into runs/frontier/NAME (resumable)
    .venv/bin/python bench/frontier.py table [--questions 300]     # the table and docs/figures/frontier.png

Each checkpoint's scores are kept in runs/frontier/scores.json by its weights' digest and the
number of questions: a second `table` scores only checkpoints it has not scored. The table's rows
are also kept by point name in docs/figures/frontier.json (committed): a point whose run is gone
(runs/ does not outlive its machine) is read from there, so that points trained in different
sessions make one table and one plot.

Every MBC point is the cpu preset (900 steps on generated documents, seed 0) with the settings below
changed; bytes per document = the bit-packed codes (slots x bits per code) + the retrieval key. The
copied-code points (``COPIED``: codes in the LLM's vocabulary, each a document token, stored under a
prefix code in B bytes) are the cpu-text preset instead, trained 300 steps with pointer and reader
together (docs/RESULTS.md, "MBC with codes in the LLM's vocabulary").
Scored on the validation split (choose settings there; the test split is for final models):
EM / F1 with each question reading its own document's bank, the same with as many unrelated
training documents, and the retrieval keys' recall of the own document. A memory larger than the
zstd-compressed text is a worse way to store what it stores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "frontier"
SCORES = RUNS / "scores.json"  # each checkpoint's scores, by its weights' digest and the questions scored
FIGURE = ROOT / "docs" / "figures" / "frontier.png"
KEPT = ROOT / "docs" / "figures" / "frontier.json"  # the table's rows by point name and questions scored

# name: model settings changed from the cpu preset (slots K, codebook size and stages, key pieces)
POINTS = {
    # key pieces must divide MiniLM's 384 dimensions
    "k8-c2048-key3": {"num_slots": 8, "retrieval_subspaces": 3},  # 11 + 3 = 14 bytes
    "k12-c2048-key32": {},  # the preset: 17 + 32 = 49 bytes
    "k48-c2048-key32": {"num_slots": 48},  # 66 + 32 = 98 bytes
    "k192-c2048-key32": {"num_slots": 192},  # 264 + 32 = 296 bytes
    # ~1 KB through residual stages (the cosine lookup has no residual: L2): 48 x 16 x 11 bits + 32.
    # (~1 KB through slots alone, K=704, is ~800M trainable parameters, 16 GB and ~9 s per step.)
    "k48x16-c2048-key32": {"num_slots": 48, "codebook_stages": 16, "codebook_metric": "l2"},  # 1,056 + 32 bytes
}
# name: (K, B, key bytes) of MBC with copied vocabulary codes: K slots, each copying one document token,
# as many as fit in B bytes under the prefix code + the key (key bytes = retrieval_subspaces)
COPIED = {
    # K near what fits: ~8.5 bits a code on generated documents (40 codes in 56 bytes left 14 unused
    # and read 39.0 EM, docs/JOURNAL.md session 35)
    "copy-k36-b40-key8": (36, 40, 8),  # 48 bytes
    "copy-k48-b56-key8": (48, 56, 8),  # 64 bytes
    "copy-k64-b80-key16": (64, 80, 16),  # 96 bytes
    "copy-k96-b112-key16": (96, 112, 16),  # 128 bytes: a generated document whole (60 tokens on average)
}
# Copied points are the cpu-text preset with their own K, bytes and key, BM25 at 0.3 (generated
# documents share many tokens), and 300 joint steps instead of its reader-only hold
COPIED_TRAIN = ["naming_steps=300", "hold_reading_steps=0"]
COPIED_STEPS = 300


def point_steps(name: str) -> int:
    return COPIED_STEPS if name in COPIED else 900


def point_preset(name: str) -> str:
    return "cpu-text" if name in COPIED else "cpu"


def point_settings(name: str) -> dict:
    """The model settings a point changes from its preset (cpu, or cpu-text for copied points)."""
    if name in COPIED:
        slots, entry_bytes, key_bytes = COPIED[name]
        return {
            "num_slots": slots,
            "code_entry_bytes": entry_bytes,
            "retrieval_subspaces": key_bytes,
            "lexical_weight": 0.3,
        }
    return POINTS[name]


# name: a token memory's `mbc train-tokens --before 2` settings: K kept tokens of 2 bytes + the 32-byte key, or
# (--entry-bytes) as many of the best-scored tokens as fit in B bytes under the fitted prefix code + a smaller key
TOKEN_POINTS = {
    "tokens-k24": ["--keep", "24"],
    "tokens-k32": ["--keep", "32"],
    "tokens-k40": ["--keep", "40"],
    "tokens-k48": ["--keep", "48"],
    "tokens-coded40-key8": ["--entry-bytes", "40", "--key-bytes", "8"],  # 48 bytes
    "tokens-coded56-key8": ["--entry-bytes", "56", "--key-bytes", "8"],  # 64 bytes
    "tokens-coded72-key8": ["--entry-bytes", "72", "--key-bytes", "8"],  # 80 bytes
    "tokens-coded88-key8": ["--entry-bytes", "88", "--key-bytes", "8"],  # 96 bytes
}
# Saves every 15 minutes: the large points' checkpoints are GBs (K=192: 3.9 GB).
TRAIN_SETTINGS = ["seed=0", "eval_every=1000000", "save_best=false", "eval_questions=300", "save_every_minutes=15"]


def trained(name: str) -> bool:
    """Whether the point's run finished its 900 steps (its last/ may hold a run stopped halfway)."""
    if name in TOKEN_POINTS:
        return (RUNS / name / "last" / "mbc_config.json").exists()  # written whole, at the end
    metrics = RUNS / name / "metrics.jsonl"
    return metrics.exists() and f'"kind": "validation", "step": {point_steps(name)}' in metrics.read_text()


def train(names: list[str]) -> None:
    for name in names:
        if trained(name):
            print(f"{name}: trained ({RUNS / name})")
            continue
        mbc = str(ROOT / ".venv" / "bin" / "mbc")
        if name in TOKEN_POINTS:
            command = [mbc, "train-tokens", "--data", "generated", *TOKEN_POINTS[name], "--before", "2"]
            print(" ".join(command + ["--output", str(RUNS / name / "last")]), flush=True)
            subprocess.run(command + ["--output", str(RUNS / name / "last")], check=True)
            continue
        command = [mbc, "train", "--preset", point_preset(name), "--data", "generated"]
        command += ["--output", str(RUNS / name), "--max-steps", str(point_steps(name))]
        for key, value in point_settings(name).items():
            command += ["--set", f"{key}={value}"]
        for setting in TRAIN_SETTINGS + (COPIED_TRAIN if name in COPIED else []):
            command += ["--train-set", setting]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)


def kept_score(key: str, compute) -> dict:
    """``compute()``, or what it gave before for the same key (a checkpoint's digest and the questions)."""
    import json

    scores = json.loads(SCORES.read_text()) if SCORES.exists() else {}
    if key not in scores:
        scores[key] = compute()
        SCORES.parent.mkdir(parents=True, exist_ok=True)
        SCORES.write_text(json.dumps(scores, indent=1))
    return scores[key]


def _every_kept_row() -> dict:
    import json

    return json.loads(KEPT.read_text()) if KEPT.exists() else {}


def kept_rows(questions: int) -> dict:
    """The rows ``KEPT`` holds for this many questions, by label."""
    return _every_kept_row().get(str(questions), {})


def keep_rows(questions: int, results: dict) -> None:
    """``results`` into ``KEPT`` beside the rows of points not in this table."""
    import json

    every = _every_kept_row()
    every[str(questions)] = {**every.get(str(questions), {}), **results}
    KEPT.write_text(json.dumps(every, indent=1, sort_keys=True) + "\n")


def weights_digest(checkpoint: Path) -> str:
    import json

    from mbc.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    return json.loads((checkpoint / CONFIG_NAME).read_text())["sha256"][WEIGHTS_NAME]


def lexical_weight(checkpoint: Path) -> float:
    """How much a token memory's choice of document leans on BM25 over its kept tokens."""
    from mbc.checkpoint import read_config_dict
    from mbc.token_memory import TokenMemoryConfig

    return TokenMemoryConfig.from_dict(read_config_dict(checkpoint)).lexical_weight


def score_tokens(checkpoint: Path, rows, unrelated: list[str]) -> dict:
    """A token memory: each question answered from a bank of its documents, and of unrelated ones."""
    from token_memory import score_token_memory  # bench/, beside this script

    from mbc.token_memory import TokenMemory

    result = score_token_memory(TokenMemory.from_pretrained(checkpoint), rows, unrelated)
    for kind in ("name", "number"):  # what MBC never read
        result[f"em_{kind}"] = result["by_kind"][kind]["em"]
    return {k: v for k, v in result.items() if "by_kind" not in k and k != "example"}


def score_point(checkpoint: Path, rows, unrelated: list[str]) -> dict:
    from mbc.data import documents
    from mbc.evaluation.validation import evaluate, reader_over, retrieval_recall
    from mbc.model import MBCModel
    from mbc.token_memory import is_token_memory

    if is_token_memory(checkpoint):
        return score_tokens(checkpoint, rows, unrelated)
    model = MBCModel.from_pretrained(checkpoint).eval()
    own, control = evaluate(model, rows).metrics, evaluate(model, rows, bank_documents=unrelated).metrics
    sizes = model.bytes_per_document()
    recall = None
    if model.retrieval_keys is not None:
        stream = documents(rows)
        reader = reader_over(model, stream)
        recall = retrieval_recall(reader, rows, dict(zip(stream, reader.bank.ids())))
        reader.bank.close()
    stored = sizes["mbc"] if model.config.quantize else sizes["mac"]
    return {
        "bytes": stored + sizes["retrieval_key"],
        "em": own["em"],
        "f1": own["f1"],
        "control_em": control["em"],
        "control_f1": control["f1"],
        "recall": recall,
        **{f"em_{kind}": own[f"em_{kind}"] for kind in ("name", "number") if f"em_{kind}" in own},
    }


def base_with_text(rows) -> dict:
    """The base LLM with BM25's top-1 document (over the validation documents) in the prompt."""
    from mbc import MBCConfig, MBCModel
    from mbc.data import documents
    from mbc.evaluation.baselines import bm25_retriever
    from mbc.evaluation.validation import chunks, scores
    from mbc.prompts import answer_prompts, context_prompt

    model = MBCModel.build(MBCConfig()).eval()
    retrieve = bm25_retriever(documents(rows), 1)
    predictions = []
    for chunk in chunks(rows, 16):
        predictions += answer_prompts(model.llm, [context_prompt(retrieve(r.question)[0], r.question) for r in chunk])
    metrics = scores(predictions, rows)
    recall = 100 * sum(retrieve(r.question)[0] == r.document for r in rows) / len(rows)
    return {"em": metrics["em"], "f1": metrics["f1"], "recall": recall}


def token_settings(name: str) -> str:
    """A token point's settings as its scores are kept ("keep=48" as before entry bytes existed)."""
    settings = dict(zip(TOKEN_POINTS[name][::2], TOKEN_POINTS[name][1::2]))
    if list(settings) == ["--keep"]:
        return f"keep={settings['--keep']}"
    return " ".join(f"{flag.lstrip('-')}={value}" for flag, value in settings.items())


def table(questions: int, mac: str | None, names: list[str], figure: Path) -> None:
    from token_memory import text_sizes  # bench/, beside this script

    from mbc import data as qa_data
    from mbc.pipeline import cached_adapter

    splits = qa_data.load_splits("generated")
    rows = splits["validation"][:questions]
    unrelated = qa_data.documents(splits["train"])[: len(qa_data.documents(rows))]
    raw, zstd = text_sizes(qa_data.documents(rows))
    kept = kept_rows(len(rows))
    results = {}
    for name in names:
        label = name if name in TOKEN_POINTS else f"mbc {name}"
        if trained(name):
            last = RUNS / name / "last"
            key = f"{weights_digest(last)} {len(rows)}"
            if name in TOKEN_POINTS:  # one scorer and one set of keys, whatever K: the same weights
                key += f" {token_settings(name)} lexical={lexical_weight(last)}"
            results[label] = kept_score(key, lambda: score_point(last, rows, unrelated))
        elif label in kept:
            print(f"{name}: no run here; its scores as {KEPT.name} keeps them")
            results[label] = kept[label]
        else:
            print(f"{name}: not trained to its end yet: bench/frontier.py train --points {name}")
    mac_checkpoint = Path(mac) if mac else cached_adapter(quantize=False)
    if mac_checkpoint is not None:
        key = f"{weights_digest(mac_checkpoint)} {len(rows)}"
        results["mac (main job's)"] = kept_score(key, lambda: score_point(mac_checkpoint, rows, unrelated))
    elif "mac (main job's)" in kept:
        results["mac (main job's)"] = kept["mac (main job's)"]
    keep_rows(len(rows), results)
    text = kept_score(f"base LLM + BM25 top-1 {len(rows)}", lambda: base_with_text(rows))
    print(f"{len(rows)} validation questions about {len(qa_data.documents(rows))} generated documents")
    print(f"{'memory':<26}{'bytes/doc':>10}{'EM':>7}{'F1':>7}{'EM unrel.':>11}{'F1 unrel.':>11}{'recall':>8}")
    for name, r in results.items():
        recall = "-" if r["recall"] is None else f"{r['recall']:.1f}"
        print(
            f"{name:<26}{r['bytes']:>10,.0f}{r['em']:>7.1f}{r['f1']:>7.1f}"
            f"{r['control_em']:>11.1f}{r['control_f1']:>11.1f}{recall:>8}"
        )
    print(
        f"{'base LLM + BM25 top-1':<26}{raw:>10,.0f}{text['em']:>7.1f}{text['f1']:>7.1f}{'':>22}{text['recall']:>8.1f}"
    )
    print(f"document text: {raw:,.0f} bytes raw, {zstd:,.0f} bytes zstd -19 (each document alone)")
    for name, r in results.items():
        if "em_name" in r:
            print(f"{name}: invented names {r['em_name']:.1f} EM, numbers {r['em_number']:.1f} EM")
    plot(results, text, raw, zstd, figure)
    print(f"written {figure}")


def plot(results: dict, text: dict, raw: float, zstd: float, figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("mbc k", "o", "MBC")]
    series += [("mbc copy", "P", "MBC, copied vocabulary codes"), ("tokens-k", "D", "token memory")]
    series += [("tokens-coded", "v", "token memory, coded")]
    for prefix, marker, label in series:
        points = sorted((r for n, r in results.items() if n.startswith(prefix)), key=lambda r: r["bytes"])
        if points:
            ax.plot([r["bytes"] for r in points], [r["em"] for r in points], f"{marker}-", label=f"{label}, own")
            ax.plot(
                [r["bytes"] for r in points],
                [r["control_em"] for r in points],
                f"{marker}--",
                label=f"{label}, unrelated",
            )
    for name, r in results.items():
        if name.startswith("mac"):
            ax.plot([r["bytes"]], [r["em"]], "s", label=f"MAC, own ({r['control_em']:.1f} unrelated)")
    ax.plot([raw], [text["em"]], "^", label="base LLM + BM25 top-1 (the text)")
    ax.axvline(raw, color="grey", linestyle=":", label="document text, raw")
    ax.axvline(zstd, color="black", linestyle=":", label="document text, zstd")
    ax.set_xscale("log")
    ax.set_xlabel("bytes stored per document")
    ax.set_ylabel("EM (validation questions)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "table"])
    known = [*POINTS, *COPIED, *TOKEN_POINTS]
    parser.add_argument("--points", default=",".join(known), help="comma-separated names")
    parser.add_argument("--questions", type=int, default=300, help="validation questions scored (table)")
    parser.add_argument("--mac", default=None, help="a MAC checkpoint (default: the one `mbc run` cached)")
    parser.add_argument("--figure", type=Path, default=FIGURE, help="where the plot goes (table)")
    args = parser.parse_args()
    names = args.points.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown point {unknown[0]!r}; known: {', '.join(known)}")
    if args.command == "train":
        train(names)
    else:
        table(args.questions, args.mac, names, args.figure)


if __name__ == "__main__":
    main()

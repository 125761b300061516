"""The ``mbc`` command: a thin layer over the Python API (each command is a few calls into it)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

import typer

from mbc.config import MBCConfig
from mbc.errors import MBCError
from mbc.settings import from_dict, parse_overrides

app = typer.Typer(add_completion=False, help="MBC: Memory Bank Compression for continual adaptation of LLMs.")

DEMO_DOCUMENTS = [
    "Mira Okafor founded the Brellin Observatory in 1987 on the slopes of Mount Caldris.",
    "The river Tasse flows through the town of Quelmont, where the annual lantern fair is held in May.",
]
DEMO_QUESTION = "Who founded the Brellin Observatory?"


def _config(config_file: Optional[Path], overrides: list[str]) -> MBCConfig:
    values = MBCConfig.load(config_file).to_dict() if config_file else {}
    return MBCConfig.from_dict(parse_overrides(MBCConfig, values, overrides))


ConfigFile = typer.Option(None, "--config", help="JSON file of MBCConfig fields")
Overrides = typer.Option([], "--set", help="override one config field, KEY=VALUE (JSON value), repeatable")


def _build(config: MBCConfig):
    from mbc.model import MBCModel  # torch and transformers load only when a command needs them

    typer.echo(f"loading {config.llm} + {config.document_encoder} ...", err=True)
    return MBCModel.build(config).eval()


def _report_sizes(model) -> None:
    counts, sizes = model.parameter_counts(), model.bytes_per_document()
    typer.echo(f"parameters: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen")
    keys = f" + {sizes['retrieval_key']} bytes of retrieval key" if sizes["retrieval_key"] else ""
    typer.echo(
        f"bank per document: MBC {sizes['mbc']} bytes on disk (bit-packed), MAC {sizes['mac']:,} bytes (float32){keys}; "
        f"codebook {sizes['codebook_total']:,} bytes once"
    )


@app.command()
def info(config_file: Optional[Path] = ConfigFile, overrides: list[str] = Overrides):
    """Parameter counts and bytes per stored document of a configuration (default: the bundled one)."""
    _report_sizes(_build(_config(config_file, overrides)))


@app.command()
def demo(config_file: Optional[Path] = ConfigFile, overrides: list[str] = Overrides):
    """End to end on the bundled models (untrained adapter): two documents into the bank, one
    training loss, one question answered greedily and with the paper's diverse beam search."""
    import torch

    from mbc.memory.bank import BankLayout, MemoryBank
    from mbc.memory.ingest import ingest
    from mbc.memory.readers import answer_from_bank, reader_for
    from mbc.network.decoding import DecodingConfig

    torch.manual_seed(0)
    model = _build(_config(config_file, overrides))
    _report_sizes(model)
    with torch.no_grad():
        out = model(DEMO_DOCUMENTS, [DEMO_QUESTION], ["Mira Okafor"], question_documents=[0])
    typer.echo(f"training loss on one example: QA {out.qa_loss.item():.3f}, VQ {out.vq_loss.item():.4f}")
    if model.retrieval_keys is not None:
        raise MBCError(
            "the demo's untrained adapter has no fitted retrieval keys (training fits them): run it with retrieval_top_k=0"
        )
    with MemoryBank.in_memory(BankLayout.of(model)) as bank:
        start = time.perf_counter()
        ingest(model, bank, DEMO_DOCUMENTS)
        typer.echo(
            f"compressed {len(DEMO_DOCUMENTS)} documents into the bank in {1000 * (time.perf_counter() - start):.0f} ms: "
            f"entries {bank.entries().reshape(len(DEMO_DOCUMENTS), -1).tolist()[:2]}"
        )
        reader = reader_for(model, bank)
        for decoding in (DecodingConfig("greedy"), DecodingConfig("diverse_beam")):
            start = time.perf_counter()
            answer = answer_from_bank(model, reader, [DEMO_QUESTION], decoding)[0]
            typer.echo(
                f"{decoding.strategy:>12}: {DEMO_QUESTION!r} -> {answer!r} ({1000 * (time.perf_counter() - start):.0f} ms)"
            )
    typer.echo("(the adapter is untrained; train one with `mbc train`, score it with `mbc validate`)")


@app.command()
def train(
    preset: str = typer.Option("cpu", help="cpu, distilgpt2, gpt2-large, gpt2-xl or llama-2-7b"),
    data: str = typer.Option("generated", help="SQuAD .json, StreamingQA / ArchivalQA .csv, or generated[:SEED]"),
    output: Path = typer.Option(Path("runs/mbc"), help="run folder: checkpoints, metrics.jsonl, loss curve"),
    first_documents: Optional[int] = typer.Option(
        None, min=1, help="keep only the first N distinct documents (and all their questions)"
    ),
    max_steps: Optional[int] = typer.Option(None, min=1, help="optimizer steps (default: the preset's epochs)"),
    max_minutes: Optional[float] = typer.Option(
        None, min=0, help="stop training after this many minutes, then validate and save"
    ),
    model_overrides: list[str] = typer.Option([], "--set", help="override a model config field, KEY=VALUE"),
    train_overrides: list[str] = typer.Option([], "--train-set", help="override a training config field, KEY=VALUE"),
):
    """Meta-train MBC on the train split (by article / document group) and validate on the validation split."""
    from mbc import data as qa_data
    from mbc.evaluation.plots import plot_loss_curve
    from mbc.training.presets import preset as load_preset
    from mbc.training.trainer import TrainConfig
    from mbc.training.trainer import train as run_training

    chosen = load_preset(preset)
    model_config = MBCConfig.from_dict(parse_overrides(MBCConfig, chosen["model"], model_overrides))
    train_values = parse_overrides(TrainConfig, dict(chosen["train"], output_dir=str(output)), train_overrides)
    train_values.update({k: v for k, v in (("max_steps", max_steps), ("max_minutes", max_minutes)) if v is not None})
    train_config = from_dict(TrainConfig, train_values, "training config")
    splits = qa_data.load_splits(data, first_documents)
    typer.echo(
        f"data {data}: "
        + ", ".join(
            f"{name} {len(rows)} questions / {len(qa_data.documents(rows))} documents" for name, rows in splits.items()
        ),
        err=True,
    )
    metrics = run_training(model_config, train_config, splits["train"], splits["validation"])
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one process writes the results
        plot_loss_curve(output / "metrics.jsonl", output / "loss.png")
        typer.echo(json.dumps({"validation": metrics, "output": str(output)}, indent=2))


@app.command()
def validate(
    checkpoint: Path = typer.Argument(..., help="a checkpoint folder (e.g. runs/mbc/best-f1)"),
    data: str = typer.Option("generated", help="the data the checkpoint was trained on (the same split is rebuilt)"),
    split: str = typer.Option("validation", help="validation or test"),
    first_documents: Optional[int] = typer.Option(None, min=1, help="as given to `mbc train`"),
    questions: Optional[int] = typer.Option(None, min=1, help="score only the first N questions of the split"),
    output: Optional[Path] = typer.Option(None, help="write the scores as JSON here"),
):
    """Score a trained checkpoint on a held-out split against the base LLM with no adaptation."""
    from mbc import data as qa_data
    from mbc.evaluation.baselines import FEW_SHOT_TEMPLATE, evaluate_base_llm
    from mbc.evaluation.validation import evaluate
    from mbc.model import MBCModel
    from mbc.paths import writable_folder

    if output:
        writable_folder(output.parent)
    splits = qa_data.load_splits(data, first_documents)
    rows = _split(splits, split, data)[:questions]
    # Control: the same questions answered from a bank of as many documents from the training split,
    # none of which is about them. What this scores comes from the adapter, not from the memory.
    unrelated = qa_data.documents(splits["train"])[: len(qa_data.documents(rows))]
    model = MBCModel.from_pretrained(checkpoint).eval()
    name = model.codec.mode
    results = {
        name: evaluate(model, rows).metrics,
        f"{name}, bank of unrelated documents": evaluate(model, rows, bank_documents=unrelated).metrics,
        "base LLM, raw question": evaluate_base_llm(model, rows).metrics,
        "base LLM, 3 worked examples": evaluate_base_llm(model, rows, FEW_SHOT_TEMPLATE).metrics,
    }
    typer.echo(f"{split}: {len(rows)} questions, {len(qa_data.documents(rows))} documents in the bank")
    typer.echo(f"{'method':<40}{'EM':>7}{'F1':>7}{'lenient EM':>12}")
    for method, metrics in results.items():
        typer.echo(f"{method:<40}{metrics['em']:>7.1f}{metrics['f1']:>7.1f}{metrics['lenient_em']:>12.1f}")
    kinds = sorted(k[len("em_") :] for k in next(iter(results.values())) if k.startswith("em_"))
    if kinds:  # generated data: what the memory carries differs by answer kind
        typer.echo(f"{'EM by answer kind':<40}" + "".join(f"{k:>9}" for k in kinds))
        for method, metrics in results.items():
            typer.echo(f"{method:<40}" + "".join(f"{metrics['em_' + k]:>9.1f}" for k in kinds))
    if output:
        output.write_text(
            json.dumps(
                {
                    "checkpoint": str(checkpoint),
                    "data": data,
                    "split": split,
                    "questions": len(rows),
                    "results": results,
                },
                indent=2,
            )
        )


@app.command()
def run(
    output: Path = typer.Option(Path("runs/main"), help="folder for the evaluation's outputs"),
    steps: int = typer.Option(650, min=1, help="training steps of each of MBC and MAC (when not cached)"),
    documents: int = typer.Option(50, min=1, help="held-out generated documents streamed into the banks"),
    retention_every: int = typer.Option(25, min=1, help="documents per retention step"),
):
    """The main job: train (or reuse from the cache) MBC and MAC adapters on generated documents,
    stream held-out documents into durable banks, evaluate every method, print the table, write plots."""
    from mbc.pipeline import MainJobConfig, run_main_job

    job = MainJobConfig(max_steps=steps, documents=documents, retention_every=retention_every, output=str(output))
    _print_summary(run_main_job(job), output)


@app.command("eval")
def evaluate_online(
    checkpoint: Path = typer.Argument(..., help="a trained MBC checkpoint folder"),
    mac: Optional[Path] = typer.Option(
        None, help="a trained MAC checkpoint (quantize=false) to compare, same base LLM"
    ),
    data: str = typer.Option("generated", help="the data the checkpoints were trained on (the same split is rebuilt)"),
    split: str = typer.Option("test", help="test or validation"),
    documents: Optional[int] = typer.Option(
        None, min=1, help="stream only the first N distinct documents of the split (default: all)"
    ),
    first_documents: Optional[int] = typer.Option(
        None, min=1, help="as given to `mbc train` (down-sampling before the split)"
    ),
    retention_every: int = typer.Option(200, min=1, help="documents per retention step"),
    decoding: str = typer.Option("greedy", help="greedy, beam or diverse_beam"),
    bm25_top_k: int = typer.Option(1, min=1, help="documents BM25 puts into the prompt"),
    max_context_tokens: Optional[int] = typer.Option(
        None, min=64, help="cut the gold-document and BM25 prompts to this many tokens (default: the LLM's window)"
    ),
    methods: Optional[str] = typer.Option(
        None,
        help="subset of the methods, separated by commas without a space, e.g. 'mbc,mbc, unrelated bank' (default: all)",
    ),
    output: Path = typer.Option(
        Path("runs/eval"), help="folder for predictions.csv, summary.json, the plots and the banks"
    ),
):
    """Stream held-out documents into durable banks and answer every question about them: MBC, MAC,
    and the baselines (base LLM raw / with worked examples / with the gold document / with BM25,
    MBC with a bank of unrelated documents), with sizes, times and retention."""
    from mbc import data as qa_data
    from mbc.evaluation.online import ALL_METHODS, EvalConfig, run_eval
    from mbc.paths import writable_folder

    # Everything that can be checked is checked before the models load and the scoring starts.
    # Method names hold ", " themselves ("mbc, unrelated bank"): only a comma not followed by a space separates.
    chosen = [m.strip() for m in re.split(r",(?! )", methods)] if methods else list(ALL_METHODS)
    config = EvalConfig(
        retention_every, decoding=decoding, bm25_top_k=bm25_top_k, max_context_tokens=max_context_tokens, methods=chosen
    )
    writable_folder(output)
    splits = qa_data.load_splits(data, first_documents)
    rows = qa_data.first_documents(_split(splits, split, data), documents)
    unrelated = qa_data.documents(splits["train"])
    from mbc.model import MBCModel

    mbc_model = MBCModel.from_pretrained(checkpoint).eval()
    mac_model = MBCModel.from_pretrained(mac).eval() if mac else None
    summary = run_eval(mbc_model, rows, unrelated, output, config, mac_model)
    _print_summary(summary, output)


def _split(splits: dict, name: str, data: str) -> list:
    if name not in splits:
        raise MBCError(f"unknown split '{name}'; choose one of {', '.join(splits)}")
    if not splits[name]:
        raise MBCError(
            f"the {name} split of {data} is empty: it has too few articles or documents to split; give more data"
        )
    return splits[name]


def _print_summary(summary: dict, output: Path) -> None:
    from mbc.evaluation.report import format_table

    typer.echo(f"{summary['questions']} questions about {summary['documents']} streamed documents")
    typer.echo(format_table(summary))
    for name, curve in summary["retention"].items():
        typer.echo(
            f"{name} F1 retention: "
            + ", ".join(
                f"{p['documents']} docs {p['retention_percent']:.0f}%"
                for p in curve
                if p.get("retention_percent") is not None
            )
        )
    for name, sizes in summary["banks"].items():
        keys = f" + {sizes['key_bytes']:,} of retrieval keys" if sizes.get("key_bytes") else ""
        typer.echo(
            f"{name} bank: {sizes['documents']} documents, {sizes['entry_bytes']:,} bytes of entries{keys} "
            f"({sizes['file_bytes']:,} bytes SQLite file); codebook {sizes['codebook_bytes']:,} bytes; "
            f"MAC float32 would take {sizes['mac_equivalent_bytes']:,} bytes"
        )
        if sizes.get("retrieval_recall_percent") is not None:
            typer.echo(
                f"{name} retrieval keys found the question's own document for "
                f"{sizes['retrieval_recall_percent']:.1f}% of questions"
            )
    for name, count in (summary.get("prompts_cut_to_fit") or {}).items():
        if count:
            typer.echo(
                f"{name}: {count} of {summary['questions']} prompts had their documents cut to fit the LLM's window"
            )
    if summary.get("bm25_recall_percent") is not None:
        typer.echo(
            f"BM25 put the question's own document into the prompt for {summary['bm25_recall_percent']:.1f}% of questions"
        )
    typer.echo(
        f"peak memory {summary['peak_memory_gb']:.2f} GB; "
        f"written to {output}/ (predictions.csv, summary.json, retention.png, bank_size.png)"
    )


def main():
    try:
        app()
    except MBCError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(getattr(error, "exit_code", 2))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130)


if __name__ == "__main__":
    main()

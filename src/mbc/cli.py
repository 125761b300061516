"""The ``mbc`` command: a thin layer over the Python API (each command is a few calls into it)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
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
# `mbc eval --method`'s keys, for its help (evaluation/online.py's METHODS: importing it loads torch)
METHOD_KEYS = (
    "mbc",
    "mbc-unrelated",
    "mac",
    "mac-unrelated",
    "base-raw",
    "base-examples",
    "base-gold",
    "base-bm25",
    "mbc-bm25",
    "tokens",
    "tokens-unrelated",
    "qa-tuned",
    "uniform",
    "salient",
    "camels",
)


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


BANK_HELP = "a bank: a file path, or postgresql://USER:PASSWORD@HOST/DATABASE?bank=NAME"
BanksOption = typer.Option(
    None, help="where the new banks go: a folder (default: OUTPUT/banks) or a postgresql:// URL (a new bank each)"
)

CamelsOption = typer.Option(
    None, help="a CaMeLS weighting model (`mbc train-camels`) for the --qa-tuned LLM: adds camels fine-tuning"
)
# Online fine-tuning's defaults for `mbc eval` and `mbc retention`: FinetuneConfig's, written out so
# that --help needs no torch (tests/test_finetuning.py holds them equal).
FinetuneRateOption = typer.Option(3e-5, help="online fine-tuning: AdamW's learning rate")
FinetuneStepsOption = typer.Option(1, help="online fine-tuning: gradient steps per document")

TOKEN_RETRIEVAL = ("lexical_weight", "embedding_weight")  # read-time weights of token_memory.py's retrieval
# read-time settings of MBC's retrieval over vocabulary codes (model.py): BM25's weight, and how many
# documents' codes input-side reading puts before the question (it trains on one)
MBC_RETRIEVAL = ("lexical_weight", "retrieval_top_k")


ExtraTrainOption = typer.Option(
    [],
    help="more training data (a file or spec, repeatable): every row joins the train split; "
    "e.g. ../shared/data/squad/squad-v1.1-train-first11.json beside SQuAD's open subset",
)


def _finetune_settings(qa_tuned: Optional[Path], learning_rate: float, steps: int, camels: Optional[Path] = None):
    """The online fine-tuning settings, and the QA-tuned and CaMeLS folders checked, before any model loads."""
    from mbc.finetuning import FinetuneConfig, check_qa_tuned

    settings = FinetuneConfig(learning_rate, steps)
    if qa_tuned:
        check_qa_tuned(qa_tuned)
    if camels:
        from mbc.camels import check_weighting_model

        if not qa_tuned:
            raise MBCError(
                "--camels fine-tunes the QA-tuned LLM its weighting model was trained on: give --qa-tuned too"
            )
        check_weighting_model(camels, qa_tuned)
    return settings


def _check_banks(banks: str | None):
    """``banks`` as given, once a folder is known writable or a server known reachable (before any model loads)."""
    from mbc.bank.postgres import free_bank_url, is_postgres_url
    from mbc.paths import writable_folder

    if banks is None:
        return None
    if not is_postgres_url(banks):
        return writable_folder(banks)
    free_bank_url(banks, "check")  # connects: an unreachable server or a wrong password is named now
    return banks


@app.command()
def info(config_file: Optional[Path] = ConfigFile, overrides: list[str] = Overrides):
    """Parameter counts and bytes per stored document of a configuration (default: the bundled one)."""
    _report_sizes(_build(_config(config_file, overrides)))


@app.command()
def demo(config_file: Optional[Path] = ConfigFile, overrides: list[str] = Overrides):
    """End to end on the bundled models (untrained adapter): two documents into the bank, one
    training loss, one question answered greedily and with the paper's diverse beam search."""
    import torch

    from mbc.bank import BankLayout, MemoryBank
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
    preset: str = typer.Option(
        "cpu",
        help="cpu, cpu-text (real text: codes in the LLM's vocabulary), distilgpt2, gpt2-large, gpt2-xl or llama-2-7b",
    ),
    data: str = typer.Option("generated", help="SQuAD .json, StreamingQA / ArchivalQA .csv, or generated[:SEED]"),
    output: Path = typer.Option(Path("runs/mbc"), help="run folder: checkpoints, metrics.jsonl, loss curve"),
    first_documents: Optional[int] = typer.Option(
        None, min=1, help="keep only the first N distinct documents (and all their questions)"
    ),
    extra_train: list[str] = ExtraTrainOption,
    max_steps: Optional[int] = typer.Option(None, min=1, help="optimizer steps (default: the preset's epochs)"),
    max_minutes: Optional[float] = typer.Option(
        None, min=0, help="stop training after this many minutes, then validate and save"
    ),
    model_overrides: list[str] = typer.Option([], "--set", help="override a model config field, KEY=VALUE"),
    train_overrides: list[str] = typer.Option([], "--train-set", help="override a training config field, KEY=VALUE"),
    start_from: Optional[Path] = typer.Option(
        None,
        help="MAC (--set quantize=false): start from a MBC run's float-memory state, <run>/float-memory "
        "(that run trained with --train-set keep_float_memory_state=true and the same settings)",
    ),
    init_from: Optional[Path] = typer.Option(
        None,
        help="start at step 0 from this checkpoint's trained weights (the same model shapes), "
        "e.g. to teach a trained adapter to read its top 2 documents (--set retrieval_top_k=2)",
    ),
):
    """Meta-train MBC on the train split (by article / document group) and validate on the validation split."""
    from mbc import data as qa_data
    from mbc.evaluation.plots import plot_loss_curve
    from mbc.presets import preset as load_preset
    from mbc.training.trainer import TrainConfig
    from mbc.training.trainer import train as run_training

    chosen = load_preset(preset)
    model_config = MBCConfig.from_dict(parse_overrides(MBCConfig, chosen["model"], model_overrides))
    train_values = parse_overrides(TrainConfig, dict(chosen["train"], output_dir=str(output)), train_overrides)
    train_values.update({k: v for k, v in (("max_steps", max_steps), ("max_minutes", max_minutes)) if v is not None})
    train_config = from_dict(TrainConfig, train_values, "training config")
    splits = qa_data.load_splits(data, first_documents, tuple(extra_train))
    typer.echo(
        f"data {data}: "
        + ", ".join(
            f"{name} {len(rows)} questions / {len(qa_data.documents(rows))} documents" for name, rows in splits.items()
        ),
        err=True,
    )
    from accelerate import PartialState

    main = PartialState().is_main_process  # under `accelerate launch`, one process writes the results
    try:
        trained_on = qa_data.describe_training(data, splits["train"], tuple(extra_train))
        metrics = run_training(
            model_config,
            train_config,
            splits["train"],
            splits["validation"],
            start_from=start_from,
            trained_on=trained_on,
            init_from=init_from,
        )
    finally:  # a run stopped midway (SIGTERM, Ctrl-C) gets the curve of the steps it made too
        if main and (output / "metrics.jsonl").exists():
            plot_loss_curve(output / "metrics.jsonl", output / "loss.png")
    if main:
        typer.echo(json.dumps({"validation": metrics, "output": str(output)}, indent=2))


@app.command("train-qa")
def train_qa(
    data: str = typer.Option("generated", help="SQuAD .json, StreamingQA / ArchivalQA .csv, or generated[:SEED]"),
    extra_train: list[str] = ExtraTrainOption,
    output: Path = typer.Option(Path("runs/qa-tuned"), help="folder for the QA-tuned LLM"),
    llm: str = typer.Option("bundled:smollm2", help="the base LLM (as MBCConfig.llm names it)"),
    steps: int = typer.Option(300, min=1, help="AdamW steps of 16 question-answer pairs"),
    learning_rate: float = typer.Option(3e-5, min=0.0, help="AdamW's learning rate"),
    first_documents: Optional[int] = typer.Option(
        None, min=1, help="keep only the first N distinct documents (and all their questions)"
    ),
):
    """The online fine-tuning baselines' starting point: the base LLM tuned closed-book on the train
    split's question-answer pairs (finetuning.py), so that it answers in the short format before any
    document of the stream reaches its weights. `mbc eval --qa-tuned FOLDER` then runs them."""
    from mbc import data as qa_data
    from mbc.finetuning import ClosedBookLLM, qa_tune
    from mbc.paths import writable_folder

    if learning_rate <= 0:
        raise MBCError(f"--learning-rate must be above 0 (a step of 0 changes nothing), got {learning_rate}")
    writable_folder(output)
    splits = qa_data.load_splits(data, first_documents, tuple(extra_train))
    pairs = [(row.question, row.answers[0]) for row in splits["train"]]
    model = ClosedBookLLM.load(llm)
    start = time.perf_counter()
    losses = qa_tune(model, pairs, steps, learning_rate)
    notes = {"data": data, "extra_train": extra_train, "llm": llm, "steps": steps, "learning_rate": learning_rate}
    notes |= {"pairs": len(pairs)}
    model.save(output, notes | {"first_loss": losses[0], "last_loss": losses[-1]})
    typer.echo(
        f"QA-tuned {llm} on {len(pairs)} question-answer pairs in {time.perf_counter() - start:.0f} s "
        f"(loss {losses[0]:.2f} -> {sum(losses[-20:]) / len(losses[-20:]):.2f}); saved to {output}"
    )


@app.command("train-camels")
def train_camels(
    qa_tuned: Path = typer.Option(..., help="the QA-tuned LLM (`mbc train-qa`) that CaMeLS will fine-tune"),
    data: str = typer.Option("generated", help="SQuAD .json, StreamingQA / ArchivalQA .csv, or generated[:SEED]"),
    extra_train: list[str] = ExtraTrainOption,
    output: Path = typer.Option(Path("runs/camels"), help="folder for the weighting model"),
    steps: int = typer.Option(300, help="meta-training steps, one document each"),
    learning_rate: float = typer.Option(1e-3, help="Adam's learning rate on the weighting model"),
    inner_learning_rate: float = typer.Option(0.1, help="the inner SGD step on the document"),
    inner_layers: int = typer.Option(2, help="the LLM's last layers the inner step moves"),
    feature_layers: int = typer.Option(4, help="frozen lower layers of the LLM the weighting model reads"),
    locality_weight: float = typer.Option(0.1, help="weight of the KL on unrelated text after the inner step"),
    questions_per_document: int = typer.Option(4, help="questions of the document in each outer loss"),
    first_documents: Optional[int] = typer.Option(
        None, min=1, help="keep only the first N distinct documents (and all their questions)"
    ),
):
    """CaMeLS's weighting model (camels.py): meta-trained so that one step of the QA-tuned LLM on a
    document, each token's loss scaled by its weight, best answers the document's questions.
    `mbc eval --qa-tuned ... --camels FOLDER` and `mbc retention` then run camels fine-tuning."""
    from mbc import data as qa_data
    from mbc.camels import CaMeLSConfig, MetaTraining, meta_train, qa_tuned_fingerprint, token_weights_text
    from mbc.finetuning import ClosedBookLLM, check_qa_tuned
    from mbc.paths import writable_folder

    config = CaMeLSConfig(
        feature_layers=feature_layers,
        inner_layers=inner_layers,
        inner_learning_rate=inner_learning_rate,
        locality_weight=locality_weight,
    )
    training = MetaTraining(steps=steps, learning_rate=learning_rate, questions_per_document=questions_per_document)
    check_qa_tuned(qa_tuned)
    writable_folder(output)
    rows = qa_data.load_splits(data, first_documents, tuple(extra_train))["train"]
    model = ClosedBookLLM.load_qa_tuned(qa_tuned)
    start = time.perf_counter()
    with (output / "metrics.jsonl").open("w") as log:
        weigher, history = meta_train(
            model, config, training, rows, lambda m: log.write(json.dumps(m) + "\n") or log.flush()
        )
    notes = {"qa_tuned": str(qa_tuned), "qa_tuned_fingerprint": qa_tuned_fingerprint(qa_tuned), "data": data}
    tail = history[-max(1, len(history) // 5) :]
    summary = {k: sum(h[k] for h in tail) / len(tail) for k in ("qa_loss", "qa_gain", "locality_kl", "mean_weight")}
    weigher.save(output, notes | {"training": training.__dict__, "last_fifth": summary})
    typer.echo(
        f"meta-trained CaMeLS for {qa_tuned} in {time.perf_counter() - start:.0f} s ({steps} steps); last fifth: "
        + ", ".join(f"{k} {v:.3f}" for k, v in summary.items())
    )
    typer.echo(token_weights_text(weigher, model, rows[0].document))
    typer.echo(f"saved to {output}")


@app.command("train-tokens")
def train_tokens(
    data: str = typer.Option("generated", help="SQuAD .json, StreamingQA / ArchivalQA .csv, or generated[:SEED]"),
    output: Path = typer.Option(Path("runs/tokens"), help="checkpoint folder of the token memory"),
    keep: int = typer.Option(48, min=1, help="tokens kept per document (2 bytes each)"),
    before: int = typer.Option(2, min=0, help="also learn to keep this many tokens ahead of each answer"),
    lexical_weight: float = typer.Option(
        0.3, min=0.0, help="weight of BM25 over the kept tokens beside the retrieval key (0: the key alone)"
    ),
    reader_steps: int = typer.Option(
        0, min=0, help="then train the LLM's KV-LoRA this many steps to answer from kept tokens (0: the LLM as it is)"
    ),
    reader_precision: str = typer.Option(
        "no", help="'bf16': train the reader under bf16 autocast (fast on CPUs with AMX, slow elsewhere)"
    ),
    codes: str = typer.Option(
        "kept",
        help="'kept': store the kept tokens themselves; 'written': MBC's codebook step on the LLM's vocabulary, "
        "each kept token rewritten by a trained layer and stored as the nearest token (--reader-steps then "
        "trains that layer and the reader together, end to end)",
    ),
    writer_lr: float = typer.Option(
        1e-5, help="with --codes written: the learning rate of the layer that writes the codes (the reader's is 3e-4)"
    ),
    key_bytes: Optional[int] = typer.Option(
        None, min=1, help="bytes of retrieval key per document, one per subspace of 256 centroids (default: 32)"
    ),
    entry_bytes: Optional[int] = typer.Option(
        None,
        min=1,
        help="store each document in this many bytes: as many of its best-scored tokens as fit under a prefix "
        "code fitted on the training documents (~11 bits a token instead of 16; --keep is then unused)",
    ),
    first_documents: Optional[int] = typer.Option(
        None, min=1, help="keep only the first N distinct documents (and all their questions)"
    ),
    extra_train: list[str] = ExtraTrainOption,
):
    """Fit a token memory (token_memory.py) on the train split: the retrieval keys and the scorer that
    chooses which of a document's own tokens it keeps; minutes on a CPU. With --reader-steps, also a
    reader: the base LLM's KV-LoRA trained to answer from the kept tokens, saved into --output every
    10 minutes and on Ctrl-C or SIGTERM; the same command continues it (a larger --reader-steps trains on)."""
    from dataclasses import replace

    from mbc import data as qa_data
    from mbc.paths import writable_folder
    from mbc.token_memory import TokenMemoryConfig
    from mbc.training.token_memory import train_token_memory

    writable_folder(output.parent)
    splits = qa_data.load_splits(data, first_documents, tuple(extra_train))
    start = time.perf_counter()
    config = from_dict(
        TokenMemoryConfig,
        {"keep": keep, "lexical_weight": lexical_weight, "codes": codes, "entry_bytes": entry_bytes},
        "token memory config",
    )
    if key_bytes:  # one byte per subspace of 256 centroids; checked as any MBCConfig is, before loading
        base = config.base | {"retrieval_subspaces": key_bytes, "retrieval_codes": 256}
        MBCConfig.from_dict(base)
        config = replace(config, base=base)
    model = train_token_memory(
        splits["train"],
        config,
        before,
        reader_steps=reader_steps,
        mixed_precision=reader_precision,
        save_to=output,
        trained_on=qa_data.describe_training(data, splits["train"], tuple(extra_train)),
        writer_learning_rate=writer_lr,
    )
    sizes = model.bytes_per_document()
    typer.echo(
        f"token memory fitted on {len(qa_data.documents(splits['train']))} documents in {time.perf_counter() - start:.0f} s: "
        f"{sizes['tokens']} bytes of tokens + {sizes['retrieval_key']} of retrieval key per document; saved to {output}"
    )


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
    from mbc.evaluation.baselines import evaluate_base_llm
    from mbc.evaluation.validation import evaluate
    from mbc.model import MBCModel
    from mbc.paths import writable_folder
    from mbc.prompts import FEW_SHOT_TEMPLATE

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
        "base LLM, raw question": evaluate_base_llm(model.llm, rows).metrics,
        "base LLM, 3 worked examples": evaluate_base_llm(model.llm, rows, FEW_SHOT_TEMPLATE).metrics,
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
    steps: Optional[int] = typer.Option(
        None, min=1, help="training steps of each of MBC and MAC when not cached (default: MainJobConfig's)"
    ),
    documents: int = typer.Option(50, min=1, help="held-out generated documents streamed into the banks"),
    retention_every: Optional[int] = typer.Option(
        None,
        min=1,
        help="documents per retention step (default: none; at 50 documents retention is 100% by "
        "construction: `mbc retention` measures it on a long stream)",
    ),
):
    """The main job: train (or reuse from the cache) MBC and MAC adapters on generated documents,
    stream held-out documents into durable banks, evaluate every method, print the table, write plots."""
    from mbc.pipeline import MainJobConfig, run_main_job

    job = MainJobConfig(documents=documents, retention_every=retention_every, output=str(output))
    if steps is not None:
        job.max_steps = steps
    _print_summary(run_main_job(job), output)


@app.command("eval")
def evaluate_online(
    checkpoint: Optional[Path] = typer.Argument(
        None, help="a trained MBC checkpoint folder (leave it out to score only MAC or a token memory)"
    ),
    mac: Optional[Path] = typer.Option(
        None, help="a trained MAC checkpoint (quantize=false) to compare, same base LLM"
    ),
    tokens: Optional[Path] = typer.Option(None, help="a token memory (`mbc train-tokens`) to compare"),
    token_retrieval: list[str] = typer.Option(
        [],
        help="read the token memory with another retrieval weight, KEY=VALUE (repeatable; keys: "
        + ", ".join(TOKEN_RETRIEVAL)
        + "); the stored bytes stay as they are",
    ),
    mbc_retrieval: list[str] = typer.Option(
        [],
        help="read MBC's vocabulary codes with other retrieval settings, KEY=VALUE (keys: "
        + ", ".join(MBC_RETRIEVAL)
        + "); the stored bytes stay as they are",
    ),
    qa_tuned: Optional[Path] = typer.Option(
        None, help="a QA-tuned LLM (`mbc train-qa`): adds the online fine-tuning methods (qa-tuned, uniform, salient)"
    ),
    camels: Optional[Path] = CamelsOption,
    finetune_learning_rate: float = FinetuneRateOption,
    finetune_steps: int = FinetuneStepsOption,
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
    method: list[str] = typer.Option(
        [],
        help="a method to run, by key or full name (repeatable; default: all but mbc-bm25, the adapter's memory on "
        f"top of BM25's document in the prompt); the keys: {', '.join(METHOD_KEYS)}",
    ),
    methods: Optional[str] = typer.Option(
        None, hidden=True, help="the older form: full names separated by a comma without a space"
    ),
    output: Path = typer.Option(
        Path("runs/eval"), help="folder for predictions.csv, summary.json, the plots and the banks"
    ),
    banks: Optional[str] = BanksOption,
):
    """Stream held-out documents into durable banks and answer every question about them: MBC, MAC,
    a token memory, and the baselines (base LLM raw / with worked examples / with the gold document / with BM25,
    MBC with a bank of unrelated documents), with sizes, times and retention."""
    from mbc import data as qa_data
    from mbc.evaluation.online import DEFAULT_METHODS, EvalConfig, run_eval, runnable_methods
    from mbc.paths import writable_folder

    # Everything that can be checked is checked before the models load and the scoring starts.
    # The older --methods: full names hold ", " themselves ("mbc, unrelated bank"), so only a comma
    # not followed by a space separates them.
    chosen = method + (re.split(r",(?! )", methods) if methods else []) or list(DEFAULT_METHODS)
    config = EvalConfig(
        retention_every,
        decoding=decoding,
        bm25_top_k=bm25_top_k,
        max_context_tokens=max_context_tokens,
        methods=chosen,
        finetune_learning_rate=finetune_learning_rate,
        finetune_steps=finetune_steps,
    )
    models = (("mbc", checkpoint), ("mac", mac), ("tokens", tokens), ("qa", qa_tuned), ("camels", camels))
    runnable_methods(config.methods, {name for name, given in models if given})
    retrieval_weights = _read_weights("--token-retrieval", token_retrieval, tokens, "--tokens", TOKEN_RETRIEVAL)
    mbc_weights = _read_weights("--mbc-retrieval", mbc_retrieval, checkpoint, "the checkpoint", MBC_RETRIEVAL)
    _finetune_settings(qa_tuned, finetune_learning_rate, finetune_steps, camels)
    writable_folder(output)
    _check_banks(banks)
    splits = qa_data.load_splits(data, first_documents)
    rows = qa_data.first_documents(_split(splits, split, data), documents)
    unrelated = qa_data.documents(splits["train"])
    from mbc.model import MBCModel

    mbc_model = MBCModel.from_pretrained(checkpoint).eval() if checkpoint else None
    if mbc_weights:
        mbc_model.config = replace(mbc_model.config, **mbc_weights)
    mac_model = MBCModel.from_pretrained(mac).eval() if mac else None
    token_model = None
    if tokens:
        from mbc.token_memory import TokenMemory

        token_model = TokenMemory.from_pretrained(tokens)
        token_model.config = replace(token_model.config, **retrieval_weights)
    summary = run_eval(
        mbc_model,
        rows,
        unrelated,
        output,
        config,
        mac_model,
        tokens=token_model,
        banks=banks,
        qa_tuned=qa_tuned,
        camels=camels,
    )
    _print_summary(summary, output)


def _read_weights(flag: str, overrides: list[str], model: Optional[Path], given_by: str, keys: tuple[str, ...]) -> dict:
    """``--token-retrieval`` / ``--mbc-retrieval`` KEY=VALUE items: how a memory is read, checked
    against its config before anything loads."""
    if not overrides:
        return {}
    if not model:
        raise MBCError(f"{flag} sets how a memory is read: give the memory with {given_by}")
    config_class = _memory_config_class(flag)
    values = parse_overrides(config_class, {}, overrides)
    other = sorted(set(values) - set(keys))
    if other:
        raise MBCError(f"{flag} sets {', '.join(keys)} only, not {', '.join(other)}")
    if config_class is MBCConfig:  # the saved settings with these: a checkpoint they do not fit is named
        from mbc.checkpoint import CONFIG_NAME

        replace(MBCConfig.load(Path(model) / CONFIG_NAME), **values)
    else:
        from_dict(config_class, values, flag)  # each weight's limits, in one line
    return values


def _memory_config_class(flag: str):
    if flag == "--mbc-retrieval":
        return MBCConfig
    from mbc.token_memory import TokenMemoryConfig

    return TokenMemoryConfig


ModelOption = typer.Option(
    None,
    "--model",
    envvar="MBC_MODEL",
    help="a trained checkpoint folder (default: $MBC_MODEL, else the MBC adapter `mbc run` trained and cached)",
)


@app.command()
def retention(
    model: Optional[Path] = ModelOption,
    mac: Optional[Path] = typer.Option(None, help="a trained MAC checkpoint to measure beside it"),
    tokens: Optional[Path] = typer.Option(None, help="a token memory (`mbc train-tokens`) to measure beside it"),
    data: str = typer.Option(
        "generated:1:2000", help="the documents to stream, all of them (default: 2,000 generated ones no run trains on)"
    ),
    every: int = typer.Option(200, min=1, help="documents per step; the questions about the first step are asked"),
    output: Path = typer.Option(Path("runs/retention"), help="folder for retention.json, retention.png and the banks"),
    banks: Optional[str] = BanksOption,
    qa_tuned: Optional[Path] = typer.Option(
        None, help="a QA-tuned LLM (`mbc train-qa`): also the curves of uniform and salient-span fine-tuning"
    ),
    camels: Optional[Path] = CamelsOption,
    finetune_learning_rate: float = FinetuneRateOption,
    finetune_steps: int = FinetuneStepsOption,
    finetuning: list[str] = typer.Option(
        [], help="with --qa-tuned: uniform, salient or camels (repeatable; default: each that the folders given allow)"
    ),
    beside: list[Path] = typer.Option(
        [],
        help="an earlier run's retention.json over the same --data and --every: its curves join this run's table "
        "and plot, and are not measured again (repeatable)",
    ),
):
    """Retention as the paper measures it: stream many documents into one bank (or, with --qa-tuned,
    into the LLM's weights) and, after every further step, answer again the questions about the
    first step's documents. retention.json is rewritten after every point, so a stopped run keeps
    what it measured."""
    from dataclasses import asdict, replace

    from mbc import data as qa_data
    from mbc.evaluation.retention import (
        FINETUNING,
        check_stream,
        format_retention,
        measure_finetuning_retention,
        measure_retention,
        read_earlier_curves,
        stream_points,
        write_retention,
    )
    from mbc.model import MBCModel
    from mbc.paths import writable_folder
    from mbc.token_memory import TokenMemory

    output = writable_folder(output)
    banks = _check_banks(banks) or writable_folder(output / "banks")
    rows = qa_data.load(data)
    points = stream_points(len(check_stream(rows, every)), every)  # before the models load
    earlier, sources = read_earlier_curves(beside, data, points)
    tuning = _finetune_settings(qa_tuned, finetune_learning_rate, finetune_steps, camels)
    tunings = [FINETUNING[key] for key in _chosen_finetuning(finetuning, qa_tuned, camels)]
    tunings = [(name, spans) for name, spans in tunings if name not in earlier or finetuning]
    if model is None and "mbc" not in earlier:
        model = _default_beside(tokens or qa_tuned or earlier)
    checkpoints = {"mbc": model, **({"mac": mac} if mac else {})}
    checkpoints = {name: folder for name, folder in checkpoints.items() if folder}
    again = [name for name in [*checkpoints, *(["tokens"] if tokens else []), *dict(tunings)] if name in earlier]
    if again:
        raise MBCError(f"{again[0]} is measured by this run and given by {sources[again[0]]}: leave one of them out")
    memories = {name: MBCModel.from_pretrained(checkpoint).eval() for name, checkpoint in checkpoints.items()}
    if tokens:  # loaded with the others, so that a wrong folder is named before hours of streaming
        checkpoints["tokens"], memories["tokens"] = tokens, TokenMemory.from_pretrained(tokens)
    notes = {"data": data, "checkpoints": {k: str(v) for k, v in checkpoints.items()}, "beside": sources}
    if qa_tuned:
        notes |= {"qa_tuned": str(qa_tuned), "finetune": asdict(tuning), "camels": str(camels) if camels else None}
    curves = dict(earlier)

    def saving(name: str):
        """retention.json rewritten with ``name``'s curve so far, after each of its points."""
        return lambda curve: write_retention({**curves, name: curve}, output, notes | {"complete": False})

    for name, memory in memories.items():
        curves[name] = measure_retention(memory, rows, banks, every, on_point=saving(name))
    for name, spans in tunings:
        tuned = replace(tuning, spans=spans)
        curves[name] = measure_finetuning_retention(qa_tuned, rows, tuned, every, camels=camels, on_point=saving(name))
    write_retention(curves, output, notes | {"complete": True})
    typer.echo(format_retention(curves))
    typer.echo(f"written to {output}/ (retention.json, retention.png)")


def _chosen_finetuning(chosen: list[str], qa_tuned: Optional[Path], camels: Optional[Path]) -> list[str]:
    """`mbc retention --finetuning`'s keys, checked; by default each one the folders given allow."""
    from mbc.evaluation.retention import FINETUNING

    unknown = [key for key in chosen if key not in FINETUNING]
    if unknown:
        raise MBCError(f"--finetuning {unknown[0]} is not one of {', '.join(FINETUNING)}")
    if chosen and not qa_tuned:
        raise MBCError("--finetuning fine-tunes a QA-tuned LLM: give --qa-tuned (a folder from `mbc train-qa`)")
    if "camels" in chosen and not camels:
        raise MBCError(
            "--finetuning camels needs its weighting model: give --camels (a folder from `mbc train-camels`)"
        )
    if not qa_tuned:
        return []
    return chosen or ["uniform", "salient", *(["camels"] if camels else [])]


def _default_beside(others) -> Optional[Path]:
    """The main job's MBC adapter; beside ``others`` (anything true: other curves to draw), None
    (with a line) when `mbc run` made none."""
    from mbc.pipeline import cached_adapter, default_model

    if not others:
        return default_model()
    found = cached_adapter()
    if found is None:
        typer.echo("no MBC adapter cached (`mbc run` makes one): the other curves without MBC's; --model adds it")
    return found


@app.command()
def ingest(
    bank: str = typer.Argument(..., help=BANK_HELP + " (created if missing)"),
    paths: list[str] = typer.Argument(..., help="text / Markdown files, folders, .jsonl or .csv files, or - (stdin)"),
    model: Optional[Path] = ModelOption,
    text_field: str = typer.Option("text", help="the JSON Lines field / CSV column holding each document's text"),
    stdin_format: str = typer.Option("lines", help="standard input: lines (a document per line) or jsonl"),
):
    """Store documents in a bank: each new one compressed to a few bytes, with its source and time.
    Content already stored is skipped, so the same command run again continues where it stopped."""
    from tqdm.auto import tqdm

    from mbc.memory.service import AddReport, bank_stats
    from mbc.memory.sources import Sources

    sources = Sources(paths, text_field, stdin_format)  # missing paths are named before the model loads
    service = _open_service(bank, model)
    start = time.perf_counter()
    report = AddReport()  # filled in batch by batch: after Ctrl-C it holds what is stored
    with tqdm(desc="stored", unit="passage") as progress:
        try:
            service.add(sources, progress, report)
        except KeyboardInterrupt:
            typer.echo(
                f"interrupted: the first {report.added + report.duplicates} passages read are in the bank "
                f"({report.added} added by this run); the same command continues from there",
                err=True,
            )
            raise SystemExit(130)
    stats = bank_stats(service.bank)
    typer.echo(
        f"{report.documents} documents read as {report.added + report.duplicates} passages: {report.added} added, "
        f"{report.duplicates} already stored ({time.perf_counter() - start:.1f} s)"
    )
    for skipped in sources.skipped:
        typer.echo(f"skipped {skipped.path}: {skipped.reason}", err=True)
    _echo_stats(stats)


@app.command()
def ask(
    bank: str = typer.Argument(..., help=BANK_HELP + ", made by `mbc ingest`"),
    questions: list[str] = typer.Argument(..., help="one or more questions"),
    model: Optional[Path] = ModelOption,
    decoding: str = typer.Option("greedy", help="greedy, beam or diverse_beam"),
    as_json: bool = typer.Option(False, "--json", help="print the answers as one JSON object"),
):
    """Answer questions from what a bank stores, naming the stored documents each one read."""
    from mbc.bank import MemoryBank
    from mbc.network.decoding import DecodingConfig

    config = DecodingConfig(decoding)
    MemoryBank.open_existing(bank).close()  # a missing bank is named before the model loads
    result = _open_service(bank, model).ask(questions, config)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for item in result["answers"]:
        typer.echo(f"Q: {item['question']}\nA: {item['answer']}")
        for document in item["documents"] or []:
            typer.echo(f"   read document {document['id']}: {_source(document['metadata'])}")
        if item["documents"] is None:
            typer.echo("   read the whole bank (this model has no retrieval keys)")
    typer.echo(f"({result['seconds']:.2f} s for {len(questions)} question{'s' * (len(questions) > 1)})")


@app.command("bank")
def bank_command(
    bank: str = typer.Argument(..., help=BANK_HELP + ", made by `mbc ingest`"),
    list_documents: bool = typer.Option(False, "--list", help="list the stored documents"),
    offset: int = typer.Option(0, min=0, help="with --list: start at this position"),
    limit: int = typer.Option(50, min=1, help="with --list: at most this many"),
    show: Optional[int] = typer.Option(None, help="show one stored document: its metadata and stored codes"),
    delete: list[int] = typer.Option([], help="delete the document with this id (repeatable)"),
    copy_to: Optional[str] = typer.Option(
        None, help="copy every document, under the same ids, into a new bank (a file or a postgresql:// URL)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
):
    """A bank's sizes and documents: list, show, delete and copy them (no model needed)."""
    from mbc.bank import MemoryBank
    from mbc.memory.service import bank_stats

    with MemoryBank.open_existing(bank) as opened:
        if copy_to is not None:
            _copy(opened, copy_to)
            return
        for document_id in delete:
            opened.remove(document_id)
            typer.echo(f"deleted document {document_id}")
        if show is not None:
            shown = {"id": show, "metadata": opened.metadata(show), "entry": opened.entries([show])[0].tolist()}
            typer.echo(json.dumps(shown, indent=2 if as_json else None))
        elif list_documents:
            listed = opened.listing(offset, limit)
            if as_json:
                typer.echo(json.dumps(listed, indent=2))
            else:
                for document in listed:
                    typer.echo(f"{document['id']:>7}  {document['bytes']:>5} B  {_source(document['metadata'])}")
        elif as_json:
            typer.echo(json.dumps(bank_stats(opened), indent=2))
        else:
            _echo_stats(bank_stats(opened))


@app.command()
def serve(
    bank: str = typer.Argument(..., help=BANK_HELP + " (created if missing)"),
    model: Optional[Path] = ModelOption,
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, min=1, max=65535),
    token: Optional[str] = typer.Option(
        None, envvar="MBC_TOKEN", help="every request must carry 'Authorization: Bearer TOKEN' (default: $MBC_TOKEN)"
    ),
    max_request_bytes: int = typer.Option(8 * 1024 * 1024, min=1024, help="larger request bodies are refused (413)"),
    allowed_host: list[str] = typer.Option(
        [], help="a name clients reach the server by, beside its addresses and localhost (repeatable; '*': any)"
    ),
):
    """An HTTP JSON API over a bank: add, ask, list, get and delete documents, statistics, health;
    OpenAPI docs at /docs."""
    from mbc.server import serve as run_server

    run_server(bank, str(model) if model else None, host, port, token, max_request_bytes, allowed_host)


def _open_service(bank: str, model: Optional[Path]):
    from mbc.memory.service import MemoryService
    from mbc.pipeline import model_or_default

    model = model_or_default(model, say=lambda line: typer.echo(line, err=True))
    typer.echo("loading the model ...", err=True)
    return MemoryService.open(bank, model)


def _copy(source, address: str) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=len(source), desc="copied", unit="document") as progress:
        copied = source.copy_to(address, progress)
    with copied:
        typer.echo(
            f"copied {len(copied)} documents to {copied.address}; both banks' digests are {copied.digest()[:16]}"
        )


def _source(metadata: dict) -> str:
    where = metadata.get("path", "?")
    for key in ("line", "row"):
        if key in metadata:
            where += f":{metadata[key]}"
    if "passage" in metadata:
        where += f" (passage {metadata['passage']} of {metadata['passages']})"
    return f"{where}, added {metadata['added']}" if "added" in metadata else where


def _echo_stats(stats: dict) -> None:
    codebook = f", codebook {stats['codebook_bytes']:,} bytes once" if stats["codebook_bytes"] else ""
    typer.echo(
        f"bank {stats['path']}: {stats['documents']:,} documents, {stats['bytes_per_document']:g} bytes per document "
        f"({stats['stored_bytes']:,} bytes stored{codebook}; MAC's float vectors would take "
        f"{stats['mac_equivalent_bytes']:,}); {stats['file_bytes']:,} bytes on disk"
    )


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
        if len(curve) < 2:
            continue  # one step: nothing was asked again
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
            f"({sizes['file_bytes']:,} bytes on disk); codebook {sizes['codebook_bytes']:,} bytes; "
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
    typer.echo(f"peak memory {summary['peak_memory_gb']:.2f} GB; written to {output}/ ({', '.join(summary['files'])})")


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

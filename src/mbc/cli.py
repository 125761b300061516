"""The ``mbc`` command: a thin layer over the Python API (each command is a few calls into it)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from .config import MBCConfig
from .decoding import DecodingConfig
from .errors import MBCError

app = typer.Typer(add_completion=False, help="MBC: Memory Bank Compression for continual adaptation of LLMs.")

DEMO_DOCUMENTS = [
    "Mira Okafor founded the Brellin Observatory in 1987 on the slopes of Mount Caldris.",
    "The river Tasse flows through the town of Quelmont, where the annual lantern fair is held in May.",
]
DEMO_QUESTION = "Who founded the Brellin Observatory?"


def _config(config_file: Optional[Path], overrides: list[str]) -> MBCConfig:
    values = MBCConfig.load(config_file).to_dict() if config_file else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise MBCError(f"--set takes KEY=VALUE, got '{item}'")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw  # a bare string such as a model path
    return MBCConfig.from_dict(values)


ConfigFile = typer.Option(None, "--config", help="JSON file of MBCConfig fields")
Overrides = typer.Option([], "--set", help="override one config field, KEY=VALUE (JSON value), repeatable")


def _build(config: MBCConfig):
    from .model import MBCModel  # torch and transformers load only when a command needs them

    typer.echo(f"loading {config.llm} + {config.document_encoder} ...", err=True)
    return MBCModel.build(config).eval()


def _report_sizes(model) -> None:
    counts, sizes = model.parameter_counts(), model.bytes_per_document()
    typer.echo(f"parameters: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen")
    typer.echo(
        f"bank per document: MBC {sizes['mbc']} bytes on disk (bit-packed), MAC {sizes['mac']:,} bytes (float32); "
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

    torch.manual_seed(0)
    model = _build(_config(config_file, overrides))
    _report_sizes(model)
    start = time.perf_counter()
    entries = model.compress(DEMO_DOCUMENTS)
    typer.echo(f"compressed {len(DEMO_DOCUMENTS)} documents in {1000 * (time.perf_counter() - start):.0f} ms: "
               f"indices {entries.reshape(len(DEMO_DOCUMENTS), -1).tolist()}")
    with torch.no_grad():
        out = model(DEMO_DOCUMENTS, [DEMO_QUESTION], ["Mira Okafor"])
    typer.echo(f"training loss on one example: QA {out.qa_loss.item():.3f}, VQ {out.vq_loss.item():.4f}")
    memory = model.memory(entries)
    for decoding in (DecodingConfig("greedy"), DecodingConfig("diverse_beam")):
        start = time.perf_counter()
        answer = model.answer([DEMO_QUESTION], memory, decoding)[0]
        typer.echo(f"{decoding.strategy:>12}: {DEMO_QUESTION!r} -> {answer!r} ({1000 * (time.perf_counter() - start):.0f} ms)")
    typer.echo("(the adapter is untrained: meaningful answers come after `mbc train`, a later milestone)")


def main():
    try:
        app()
    except MBCError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2)

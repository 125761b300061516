"""Retention as the paper measures it: how well questions about the first documents of a long
stream are still answered as the bank grows.

The documents of ``rows`` stream into one bank, ``every`` at a time. After each step the questions
about the first ``every`` documents are answered again: F1, F1 relative to right after those
documents were stored (retention, percent), and, for a model with retrieval keys, the share of
those questions whose own document the keys still put first (recall). A bank entry never
changes once stored, so with keys what the stream can take away is the right document's place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mbc.data import QAExample, documents
from mbc.errors import MBCError
from mbc.evaluation.metrics import retention_percent, score
from mbc.evaluation.online import fresh_bank
from mbc.evaluation.validation import chunks, retrieval_recall
from mbc.memory.ingest import ingest
from mbc.memory.protocol import Memory
from mbc.memory.readers import RetrievalReader, answer_from_bank, reader_for
from mbc.network.decoding import DecodingConfig


def check_stream(rows: list[QAExample], every: int) -> list[str]:
    """The distinct documents of ``rows``, in order, when they make at least two steps of ``every``."""
    stream = documents(rows)
    if len(stream) < 2 * every:
        raise MBCError(
            f"{len(stream)} documents make fewer than two steps of {every}: stream more documents or lower --every"
        )
    return stream


def stream_points(n_documents: int, every: int) -> list[int]:
    """The documents streamed at each point of a curve."""
    return [min(start + every, n_documents) for start in range(0, n_documents, every)]


# `mbc retention --finetuning` keys: the curve's name and FinetuneConfig.spans.
FINETUNING = {
    "uniform": ("uniform fine-tuning", "all"),
    "salient": ("salient spans (rules)", "salient"),
    "camels": ("camels fine-tuning", "camels"),
}


def read_earlier_curves(paths: list[str | Path], data: str, points: list[int]) -> tuple[dict, dict]:
    """The curves of earlier runs' ``retention.json`` files over the same stream (``data``, with a
    point at each of ``points``), to stand beside this run's, and the file each one came from: an
    hours-long curve is measured once and drawn again beside the next ones."""
    curves, sources = {}, {}
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text())
            theirs, their_data = dict(saved["curves"]), saved["data"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MBCError(f"{path} is not a retention.json written by `mbc retention` ({error})") from None
        if their_data != data:
            raise MBCError(f"{path} streamed {their_data}, this run streams {data}: give the same --data")
        for name, curve in theirs.items():
            if [p["documents"] for p in curve] != points:
                raise MBCError(
                    f"{path}: {name} has points at {[p['documents'] for p in curve]} documents, this run at "
                    f"{points}: give the same --every (an unfinished run's curve stops early)"
                )
            if name in curves:
                raise MBCError(f"{name} is in both {sources[name]} and {path}: give one of them")
            curves[name], sources[name] = curve, str(path)
    return curves, sources


SAMPLE_ANSWERS = 3  # answers kept with each point of a curve


def _curve(
    rows: list[QAExample],
    every: int,
    adapt,
    answer,
    recall=None,
    name: str = "retention",
    on_point=None,
    before_stream: bool = False,
) -> list[dict]:
    """The retention curve of one way of adapting: ``adapt(documents)`` takes in each step's
    documents, ``answer(questions)`` answers, ``recall(probe)`` (None: no retrieval) says how often
    a probe question's own document is found; ``on_point(curve)`` sees the curve so far after each
    point (so that an hours-long run leaves what it measured if it is stopped). ``before_stream``:
    the first point also holds EM and F1 before any document (``"before_stream"``), for a method
    that answers without its documents too (a fine-tuned LLM): retention is measured from the
    first point, and only the start says whether the stream left it above where it began."""
    stream = check_stream(rows, every)
    first = set(stream[:every])
    probe = [r for r in rows if r.document in first]
    golds = [list(r.answers) for r in probe]
    before = score(answer([r.question for r in probe]), golds) if before_stream else None
    curve = []
    steps = list(zip(range(0, len(stream), every), stream_points(len(stream), every)))
    for start, streamed in tqdm(steps, desc=f"{name}: stream", unit="step"):
        adapt(stream[start:streamed])
        answers = answer([r.question for r in probe])
        scores = score(answers, golds)
        point = {"documents": streamed, "em": scores["em"], "f1": scores["f1"]}
        point["retention_percent"] = retention_percent(point["f1"], (curve[0] if curve else point)["f1"])
        point["recall_percent"] = recall(probe) if recall else None
        if before and not curve:
            point["before_stream"] = {"em": before["em"], "f1": before["f1"]}
        # A few answers as given, so that a falling curve shows how the answers changed.
        sample = zip(probe[:SAMPLE_ANSWERS], answers)
        curve.append(
            {**point, "sample": [{"question": r.question, "answer": a, "gold": r.answers[0]} for r, a in sample]}
        )
        if on_point:
            on_point(curve)
    return curve


def _batched(answer, batch_size: int):
    return lambda questions: [a for chunk in chunks(questions, batch_size) for a in answer(chunk)]


def measure_retention(
    model: Memory,
    rows: list[QAExample],
    banks: str | Path,
    every: int = 200,
    batch_size: int = 64,
    decoding: DecodingConfig | None = None,
    on_point=None,
) -> list[dict]:
    """Stream into a new bank in ``banks`` (a folder or a postgresql:// URL). One point per step of
    ``every`` documents: documents stored, EM, F1, retention and recall (percent; recall None
    without retrieval keys) on the questions about the first ``every``."""
    check_stream(rows, every)
    bank = fresh_bank(model, banks, f"retention-{every}")
    reader, bank_ids = reader_for(model, bank), {}

    def adapt(added: list[str]) -> None:
        bank_ids.update(zip(added, ingest(model, bank, added, batch_size=batch_size).ids))

    recall = None
    if isinstance(reader, RetrievalReader):
        recall = lambda probe: retrieval_recall(reader, probe, bank_ids, batch_size)  # noqa: E731
    try:
        return _curve(
            rows,
            every,
            adapt,
            _batched(lambda q: answer_from_bank(model, reader, q, decoding), batch_size),
            recall,
            on_point=on_point,
        )
    finally:
        bank.close()


def measure_finetuning_retention(
    qa_tuned: str | Path,
    rows: list[QAExample],
    config,
    every: int = 200,
    batch_size: int = 64,
    decoding: DecodingConfig | None = None,
    camels: str | Path | None = None,
    on_point=None,
) -> list[dict]:
    """The same curve for online fine-tuning (finetuning.py, ``config`` a ``FinetuneConfig``) of the
    QA-tuned LLM in ``qa_tuned``: each step's documents go into its weights; recall is None.
    ``camels``: the weighting model's folder, when ``config.spans`` is "camels"."""
    from mbc.finetuning import ClosedBookLLM, OnlineFinetuning

    check_stream(rows, every)
    model = ClosedBookLLM.load_qa_tuned(qa_tuned)
    weigher = None
    if config.spans == "camels":
        from mbc.camels import WeightingModel

        weigher = WeightingModel.load(camels, model, qa_tuned)
    tuner = OnlineFinetuning(model, config, weigher)

    def adapt(added: list[str]) -> None:
        for document in added:
            tuner.adapt(document)

    with torch.no_grad():
        answer = _batched(lambda q: model.answer(q, decoding), batch_size)
        name = f"fine-tuning ({config.spans} tokens)"
        return _curve(rows, every, adapt, answer, name=name, on_point=on_point, before_stream=True)


def write_retention(curves: dict[str, list[dict]], output: str | Path, notes: dict | None = None) -> None:
    """``retention.json`` (the curves and ``notes``) and ``retention.png`` into ``output``."""
    from mbc.evaluation.plots import plot_retention_and_recall

    output = Path(output)
    (output / "retention.json").write_text(json.dumps({"curves": curves, **(notes or {})}, indent=2))
    plot_retention_and_recall(curves, output / "retention.png")


def format_retention(curves: dict[str, list[dict]]) -> str:
    """A table: one line per point, F1 / retention / recall of each model."""
    names = list(curves)
    widths = {n: max(12, len(n) + 5) for n in names}
    head = f"{'documents':>10}" + "".join(f"{n + ' F1':>{widths[n]}}{'retention':>11}{'recall':>8}" for n in names)
    lines = [head]
    starts = {n: curves[n][0].get("before_stream") for n in names}
    if any(starts.values()):
        cells = [f"{s['f1']:.1f}" if s else "-" for s in starts.values()]
        lines.append(f"{'before':>10}" + "".join(f"{c:>{widths[n]}}{'':>19}" for n, c in zip(names, cells)))
    for i, point in enumerate(curves[names[0]]):
        line = f"{point['documents']:>10,}"
        for name in names:
            p = curves[name][i]
            recall = "-" if p["recall_percent"] is None else f"{p['recall_percent']:.1f}"
            kept = "-" if p["retention_percent"] is None else f"{p['retention_percent']:.1f}%"
            line += f"{p['f1']:>{widths[name]}.1f}{kept:>11}{recall:>8}"
        lines.append(line)
    return "\n".join(lines)

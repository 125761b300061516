"""`mbc serve` under load: requests per second, ask and add latency, errors, lost documents.

    .venv/bin/python bench/serve.py [--model CHECKPOINT] [--clients 4] [--seconds 60] [--prefill 50]
                                    [--replicas 1 2] [--bank postgresql://...]

For each setup, side by side in one run: one `mbc serve` on an SQLite bank file, then ``--replicas``
servers on one PostgreSQL bank (``--bank``; default: a throwaway server from the pgserver wheel,
scripts/local_postgres.py), more than one replica measured twice: with torch's own thread count
and with the cores split between them (``--split-cores``: cores/N threads each). Each setup
starts the real servers (uvicorn on free localhost ports) on a new bank with the given model
(default: the MBC adapter `mbc run` trained and cached), adds ``--prefill`` generated documents,
then measures:

1. one client asking, one question per request, for ``--seconds``: ask latency alone;
2. ``--clients`` clients at once for ``--seconds``, client i talking to replica i mod N, each
   alternating an add (one new generated document) and an ask: latency of each under load,
   requests per second, errors.

Afterwards every document whose add was acknowledged is looked up in the bank: the
acknowledged-but-missing count must be 0, as must the errors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from mbc.bank import MemoryBank
from mbc.bank.postgres import free_bank_url
from mbc.data.generated import generate_examples
from mbc.pipeline import default_model
from mbc.server import free_port, launch


class Load:
    """Latencies by request kind, errors, and the ids of acknowledged adds, from several threads."""

    def __init__(self):
        self.lock, self.latency, self.errors, self.acknowledged = threading.Lock(), {"ask": [], "add": []}, [], {}

    def record(self, kind: str, seconds: float, response: httpx.Response | None, error: str | None = None):
        with self.lock:
            if response is not None and response.status_code == 200:
                self.latency[kind].append(seconds)
            else:
                self.errors.append(error or f"{kind}: HTTP {response.status_code} {response.text[:200]}")

    def timed(self, client: httpx.Client, kind: str, path: str, body: dict):
        start = time.perf_counter()
        try:
            response = client.post(path, json=body)
        except httpx.HTTPError as failure:
            self.record(kind, 0.0, None, f"{kind}: {type(failure).__name__}: {failure}")
            return None
        self.record(kind, time.perf_counter() - start, response)
        return response if response.status_code == 200 else None


def client_loop(url: str, load: Load, deadline: float, documents: list[str], questions: list[str], adds: bool):
    with httpx.Client(base_url=url, timeout=300) as client:
        turn = 0
        while time.monotonic() < deadline:
            if adds and turn % 2 == 0 and documents:
                text = documents.pop()
                response = load.timed(client, "add", "/documents", {"documents": [{"text": text}]})
                if response is not None:
                    with load.lock:
                        load.acknowledged.update(dict.fromkeys(response.json()["ids"], text))
            else:
                load.timed(client, "ask", "/ask", {"questions": [questions[turn % len(questions)]]})
            turn += 1


def run_phase(urls: list[str], clients: int, seconds: float, documents: list[str], questions: list[str], adds: bool):
    load, deadline = Load(), time.monotonic() + seconds
    threads = [
        threading.Thread(target=client_loop, args=(urls[i % len(urls)], load, deadline, documents, questions, adds))
        for i in range(clients)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return load, time.perf_counter() - start


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def seconds(values: list[float], q: int) -> str:
    return f"{percentile(values, q):.2f}s" if values else "-"


def measure(bank: str, replicas: int, model, args, texts: list[str], questions: list[str], threads=None) -> dict:
    """Both phases on ``replicas`` servers sharing ``bank`` (each with ``threads`` torch threads:
    None, torch's own choice); the acknowledged adds checked against the bank."""
    prefill, stream = texts[: args.prefill], texts[args.prefill :][::-1]
    ports = [free_port() for _ in range(replicas)]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    processes = [launch(bank, model, port, env=env) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        httpx.post(f"{urls[0]}/documents", json={"documents": [{"text": t} for t in prefill]}, timeout=600)
        alone, alone_seconds = run_phase(urls[:1], 1, args.seconds, stream, questions, adds=False)
        loaded, loaded_seconds = run_phase(urls, args.clients, args.seconds, stream, questions, adds=True)
    finally:
        for process in processes:
            process.terminate()
            process.wait(60)
    with MemoryBank.open_existing(bank) as opened:
        stored = set(opened.ids())
    missing = [i for i in loaded.acknowledged if i not in stored]
    return {"alone": (alone, alone_seconds), "loaded": (loaded, loaded_seconds), "missing": missing}


def row(name: str, load: Load, elapsed: float) -> str:
    count = sum(len(v) for v in load.latency.values()) + len(load.errors)
    ask, add = load.latency["ask"], load.latency["add"]
    latencies = "".join(f"{seconds(values, q):>9}" for values in (ask, add) for q in (50, 95))
    return f"{name:<56}{count / elapsed:>11.2f}{latencies}{len(load.errors):>8}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--prefill", type=int, default=50)
    parser.add_argument("--replicas", type=int, nargs="*", default=[1, 2], help="replica counts on PostgreSQL")
    parser.add_argument("--bank", default=None, help="a postgresql:// URL (default: a throwaway local server)")
    parser.add_argument(
        "--split-cores",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure N replicas with cores/N torch threads each",
    )
    args = parser.parse_args()
    model = args.model or default_model()
    examples = generate_examples(4000, seed=7)
    texts = list(dict.fromkeys(e.document for e in examples))
    questions = [e.question for e in examples[: 6 * args.prefill]]

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        results["SQLite file, 1 server"] = measure(str(Path(folder) / "bank.db"), 1, model, args, texts, questions)
        server = None
        if args.replicas and args.bank is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
            from local_postgres import LocalPostgres

            server = LocalPostgres(Path(folder) / "postgres").start()
        try:
            base = args.bank or server.url
            for replicas in args.replicas:
                name = f"PostgreSQL, {replicas} replica{'s' * (replicas > 1)}"
                bank = free_bank_url(base, f"bench_{replicas}")
                results[name] = measure(bank, replicas, model, args, texts, questions)
                if replicas > 1 and args.split_cores:  # each its share of the cores, not all of them each
                    threads = max(1, (os.cpu_count() or 1) // replicas)
                    bank = free_bank_url(base, f"bench_{replicas}_split")
                    results[f"{name} x {threads} thread{'s' * (threads > 1)}"] = measure(
                        bank, replicas, model, args, texts, questions, threads
                    )
        finally:
            if server is not None:
                server.stop()

    print(f"model {model}; each bank prefilled with {args.prefill} documents; {args.seconds:.0f} s per phase")
    header = f"{'setup, phase':<56}{'requests/s':>11}{'ask p50':>9}{'ask p95':>9}{'add p50':>9}{'add p95':>9}"
    print(f"{header}{'errors':>8}")
    for setup, result in results.items():
        alone, loaded = result["alone"], result["loaded"]
        print(row(f"{setup}: 1 client, ask", *alone))
        print(row(f"{setup}: {args.clients} clients, add + ask", *loaded))
    for setup, result in results.items():
        loaded = result["loaded"][0]
        ratio = percentile(loaded.latency["ask"], 50) / percentile(result["alone"][0].latency["ask"], 50)
        print(
            f"{setup}: {len(loaded.acknowledged)} adds acknowledged, {len(result['missing'])} of them missing "
            f"from the bank; ask p50 under load / alone {ratio:.2f}x"
        )
        for error in (result["alone"][0].errors + loaded.errors)[:5]:
            print(f"error: {error}")


if __name__ == "__main__":
    main()

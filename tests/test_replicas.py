"""Several `mbc serve` replicas and an `mbc ingest` on one PostgreSQL bank, crashes included: every
acknowledged add is readable from every replica, and survives a replica's and the database's
SIGKILL. Real processes throughout: a PostgreSQL server, uvicorn, the tiny model."""

import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from conftest import DOCUMENTS, QUESTIONS, start_postgres
from test_server import Server, _add

from mbc.bank import MemoryBank, content_hash


class Stream:
    """Adds notes one request at a time, each to the next live replica; keeps what was acknowledged
    (id -> text). A refused or unanswered request is tried again: it was not acknowledged."""

    def __init__(self, replicas):
        self.replicas, self.acknowledged, self.refused = replicas, {}, 0
        self.stop, self.number = threading.Event(), 0
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            live = [r for r in self.replicas if r.process.poll() is None]
            text = f"Streamed note {self.number}: the {['red', 'blue', 'green'][self.number % 3]} door opens."
            try:
                response = _add(live[self.number % len(live)].client, [text], metadata={"n": self.number})
            except httpx.TransportError:
                continue  # that replica was killed under this request
            if response.status_code != 200:
                assert response.status_code == 503, response.text  # the database is away: try again
                self.refused += 1
                time.sleep(0.05)
                continue
            self.acknowledged[response.json()["ids"][0]] = text
            self.number += 1

    def wait_for(self, count: int, timeout: float = 120):
        deadline = time.time() + timeout
        while len(self.acknowledged) < count and time.time() < deadline:
            time.sleep(0.05)
        assert len(self.acknowledged) >= count, f"only {len(self.acknowledged)} adds acknowledged"

    def end(self):
        self.stop.set()
        self.thread.join(120)


def _counts_equal_a_recount(bank):
    entries = bank.entries()
    recount = {}
    for key in bank.layout.format.vector_keys(entries.reshape(-1, entries.shape[-1])).tolist():
        recount[key] = recount.get(key, 0) + 1
    codes, counts = bank.code_counts()
    assert dict(zip(bank.layout.format.vector_keys(codes).tolist(), counts.tolist())) == recount


def test_replicas_share_one_postgres_bank_through_crashes(tiny_checkpoint, tmp_path):
    database = start_postgres(tmp_path / "postgres")
    url = f"{database.url}?bank=shared"
    replicas = [Server(url, tiny_checkpoint) for _ in range(2)]
    stream = Stream(replicas)
    try:
        stream.wait_for(10)
        (tmp_path / "notes.txt").write_text(DOCUMENTS[0])
        ingest = subprocess.run(
            [sys.executable, "-m", "mbc.cli", "ingest", url, str(tmp_path / "notes.txt"), "--model", tiny_checkpoint],
            capture_output=True,
            text=True,
        )
        assert ingest.returncode == 0, ingest.stderr
        stream.wait_for(20)
        for replica in replicas:  # each replica reads what the other and `mbc ingest` stored
            before = dict(stream.acknowledged)  # acknowledged before this replica is asked
            listed = replica.client.get("/documents", params={"limit": 1000}).json()["documents"]
            assert set(before) <= {d["id"] for d in listed}
            assert any(d["metadata"].get("path", "").endswith("notes.txt") for d in listed)
            answered = replica.client.post("/ask", json={"questions": QUESTIONS[:1]})
            assert answered.status_code == 200 and answered.json()["answers"][0]["documents"]

        replicas[0].process.send_signal(signal.SIGKILL)  # a replica dies mid-stream ...
        replicas[0].process.wait(30)
        stream.wait_for(len(stream.acknowledged) + 5)
        database.kill()  # ... and so does the database, under the other replica's adds
        time.sleep(1)
        database.start()
        stream.wait_for(len(stream.acknowledged) + 10)  # the live replica reconnects and goes on
    finally:
        stream.end()
        for replica in replicas:
            replica.stop()

    with MemoryBank.open_existing(url) as bank:  # every acknowledged add, whole, and counts that agree
        for document_id, text in stream.acknowledged.items():
            assert bank.known([text]) == {content_hash(text): document_id}
        assert len(bank) == len(stream.acknowledged) + 1  # the stream's notes and the ingested file
        _counts_equal_a_recount(bank)
        assert np.all(np.asarray([bank.metadata(i).get("n", 0) for i in bank.ids()]) >= 0)
    database.stop()

"""`mbc serve`, started for real (uvicorn on a free localhost port, the tiny model of
conftest.tiny_checkpoint) and spoken to over HTTP."""

import signal
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import DOCUMENTS, QUESTIONS
from typer.testing import CliRunner

from mbc.bank import MemoryBank
from mbc.cli import app
from mbc.server import _host_name, free_port, launch

STARTUP_SECONDS = 180


class Server:
    def __init__(self, bank, checkpoint, token=None, extra=()):
        self.port, self.bank = free_port(), bank
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = launch(bank, checkpoint, self.port, token, STARTUP_SECONDS, extra)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self.client.close()


@pytest.fixture
def server(tiny_checkpoint, tmp_path):
    running = Server(tmp_path / "bank.db", tiny_checkpoint)
    yield running
    running.stop()


def _add(client, texts, headers=None, **extra):
    return client.post("/documents", json={"documents": [{"text": t, **extra} for t in texts]}, headers=headers)


def test_add_ask_list_get_delete_stats(server):
    client = server.client
    assert client.get("/health").json() == {"status": "ok", "documents": 0}
    added = _add(client, DOCUMENTS, metadata={"from": "test"}).json()
    assert added["added"] == 3 and added["duplicates"] == 0 and len(added["ids"]) == 3
    assert _add(client, DOCUMENTS[:1]).json() == {"added": 0, "duplicates": 1, "ids": added["ids"][:1]}
    answered = client.post("/ask", json={"questions": QUESTIONS}).json()
    assert [a["question"] for a in answered["answers"]] == QUESTIONS
    assert all(a["documents"][0]["id"] in added["ids"] for a in answered["answers"])
    listed = client.get("/documents", params={"limit": 2}).json()["documents"]
    assert [d["id"] for d in listed] == added["ids"][:2] and listed[0]["metadata"]["from"] == "test"
    first = client.get(f"/documents/{added['ids'][0]}").json()
    assert first["metadata"]["characters"] == len(DOCUMENTS[0]) and "added" in first["metadata"]
    assert client.delete(f"/documents/{added['ids'][0]}").json() == {"deleted": added["ids"][0]}
    stats = client.get("/stats").json()
    assert stats["documents"] == 2 and stats["bytes_per_document"] == 3 and stats["mode"] == "mbc"
    assert client.get("/docs").status_code == 200 and "/ask" in client.get("/openapi.json").json()["paths"]


def test_every_bad_request_gets_a_json_error_and_changes_nothing(server):
    client = server.client
    _add(client, DOCUMENTS)
    json_headers = {"Content-Type": "application/json"}
    cases = [
        (client.post("/documents", content=b'{"documents": [', headers=json_headers), 400, "not valid JSON"),
        (client.post("/ask", content=b"\xff\xfe", headers=json_headers), 400, "not valid JSON"),
        (client.post("/documents", json={"documents": [{"text": "   "}]}), 422, "documents.0.text"),
        (client.post("/documents", json={"documents": []}), 422, "documents"),
        (client.post("/documents", json={"documents": "text"}), 422, "documents"),
        (client.post("/documents", json={"documents": [{"text": 5}]}), 422, "documents.0.text"),
        (client.post("/documents", json={"documents": [{"text": "x", "metadata": [1]}]}), 422, "metadata"),
        (client.post("/documents", json={"texts": ["x"]}), 422, "documents: Field required"),
        (client.post("/ask", json={"questions": [""]}), 422, "questions.0"),
        (client.post("/ask", json={"questions": "why?"}), 422, "questions"),
        (client.post("/ask", json={"questions": ["why?"], "decoding": "sampling"}), 422, "decoding"),
        (client.post("/ask", json={"questions": ["why?"], "max_new_tokens": 0}), 422, "max_new_tokens"),
        (client.post("/ask", json={"questions": ["q"] * 300}), 422, "questions"),
        (client.post("/documents", json={"documents": [{"text": "x" * 9_000_000}]}), 413, "over the limit"),
        (client.get("/documents/999"), 404, "no document with id 999"),
        (client.delete("/documents/999"), 404, "no document with id 999"),
        (client.get("/documents/abc"), 422, "document_id"),
        (client.get("/documents", params={"limit": 0}), 422, "limit"),
        (client.get("/nowhere"), 404, ""),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (response.request.url, response.text)
        body = response.json()
        assert message in body.get("error", body.get("detail", "")), body
    assert client.get("/health").json() == {"status": "ok", "documents": 3}


def test_the_token_is_required_when_set(tiny_checkpoint, tmp_path):
    running = Server(tmp_path / "bank.db", tiny_checkpoint, token="s3cret")
    try:
        assert httpx.get(f"{running.url}/health").status_code == 401
        assert "needs a bearer token" in httpx.get(f"{running.url}/stats").json()["error"]
        wrong = httpx.post(f"{running.url}/documents", headers={"Authorization": "Bearer nope"}, json={})
        assert wrong.status_code == 401 and wrong.json() == {"error": "wrong bearer token"}
        assert running.client.get("/health").json()["status"] == "ok"
        assert _add(running.client, DOCUMENTS[:1]).json()["added"] == 1
    finally:
        running.stop()


def test_answers_see_what_another_process_appends(server, tiny_checkpoint):
    empty = server.client.post("/ask", json={"questions": QUESTIONS[:1]})
    assert empty.status_code == 400 and "is empty" in empty.json()["error"]
    result = CliRunner().invoke(app, ["ingest", str(server.bank), "-", "--model", tiny_checkpoint], input=DOCUMENTS[0])
    assert result.exit_code == 0, result.output
    answered = server.client.post("/ask", json={"questions": QUESTIONS[:1]}).json()
    assert answered["answers"][0]["documents"][0]["metadata"]["path"] == "<stdin>"  # the only document there is


def test_a_killed_server_keeps_every_acknowledged_add(tiny_checkpoint, tmp_path):
    running = Server(tmp_path / "bank.db", tiny_checkpoint)
    acknowledged, stop = {}, threading.Event()

    def stream():
        for i in range(10_000):
            if stop.is_set():
                return
            text = f"Streamed note {i}: the {['red', 'blue', 'green'][i % 3]} door opens at {i % 24} o'clock."
            try:
                response = _add(running.client, [text, text + " Twice."], metadata={"i": i})
            except httpx.TransportError:
                return  # the server is gone: this add was never acknowledged
            acknowledged.update(zip(response.json()["ids"], [text, text + " Twice."]))

    writer = threading.Thread(target=stream)
    writer.start()
    while len(acknowledged) < 30:
        time.sleep(0.05)
    running.process.send_signal(signal.SIGKILL)  # in the middle of the stream
    running.process.wait(30)
    stop.set()
    writer.join(60)
    running.client.close()

    with MemoryBank.open_existing(tmp_path / "bank.db") as bank:  # every checksum is checked on reading
        ids = bank.ids()
        assert set(acknowledged) <= set(ids)
        entries = bank.entries()
        codes, counts = bank.code_counts()
        recount = {}
        for key in bank.layout.format.vector_keys(entries.reshape(-1, entries.shape[-1])).tolist():
            recount[key] = recount.get(key, 0) + 1
        stored_counts = dict(zip(bank.layout.format.vector_keys(codes).tolist(), counts.tolist()))
        assert stored_counts == recount  # the counts hold exactly the stored rows: nothing half-written
        assert np.all(np.asarray([bank.metadata(i)["i"] for i in ids]) >= 0)
    restarted = Server(tmp_path / "bank.db", tiny_checkpoint)
    try:
        assert restarted.client.get("/health").json()["documents"] == len(ids)
    finally:
        restarted.stop()


def test_a_rebound_name_is_refused_and_changes_nothing(tiny_checkpoint, tmp_path):
    """DNS rebinding: a web page reaches 127.0.0.1 under a name of its own, which the server refuses."""
    running = Server(tmp_path / "bank.db", tiny_checkpoint, extra=["--allowed-host", "memory.internal"])
    try:
        client = running.client
        for host in ["attacker.example", f"attacker.example:{running.port}", "127.0.0.1.attacker.example", "", "[::1"]:
            listed = client.get("/documents", headers={"Host": host})
            assert listed.status_code == 400 and "--allowed-host" in listed.json()["error"], (host, listed.text)
            assert _add(client, DOCUMENTS[:1], headers={"Host": host}).status_code == 400
        assert client.get("/health").json()["documents"] == 0  # nothing a refused request sent was stored
        port = running.port
        for host in ["127.0.0.1", f"localhost:{port}", f"LOCALHOST:{port}", "[::1]:80", "memory.internal"]:
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
    finally:
        running.stop()


@pytest.mark.parametrize("given", [["--token", ""], ["--token", "   "], []])
def test_an_empty_token_is_refused(given, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MBC_TOKEN", "  ")  # read when --token is left out
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "bank.db"), "--model", tiny_checkpoint, *given])
    assert result.exit_code != 0 and "is empty" in str(result.exception), result.output
    assert not (tmp_path / "bank.db").exists()  # refused before anything was opened


def test_host_names_are_read_without_their_port():
    hosts = ["a.b:80", "A.B", "[::1]:8000", "[::1]", "x:y", "", ":80", "[::1"]
    assert [_host_name(h) for h in hosts] == ["a.b", "a.b", "::1", "::1", None, None, None, None]


def test_hostile_requests_get_4xx_and_change_nothing(server):
    client = server.client
    _add(client, DOCUMENTS)
    json_headers = {"Content-Type": "application/json"}
    deep = '{"documents": [{"text": "x", "metadata": ' + '{"a": ' * 500 + "1" + "}" * 500 + "}]}"
    cases = [
        (client.get("/documents/" + "9" * 30), 422, "document_id"),
        (client.delete("/documents/" + "9" * 30), 422, "document_id"),
        (client.get("/documents", params={"offset": 10**30}), 422, "offset"),
        (client.post("/documents", content=deep, headers=json_headers), 422, "nested more than 32 levels"),
        (client.post("/documents", content="[" * 100_000 + "]" * 100_000, headers=json_headers), 400, "not valid JSON"),
        (
            client.post(
                "/documents", content=b'{"documents": [{"text": "x", "metadata": {"v": NaN}}]}', headers=json_headers
            ),
            422,
            "finite numbers",
        ),
        (
            client.post("/documents", content=b'{"documents": [{"text": "a \\ud800 b"}]}', headers=json_headers),
            422,
            "documents.0.text",  # pydantic refuses a lone surrogate while parsing
        ),
        (client.post("/ask", content=b'{"questions": ["a \\udfff b"]}', headers=json_headers), 422, "questions.0"),
        (client.post("/ask", json={"questions": ["x" * 5000]}), 422, "questions.0"),
        (client.post("/ask", json={"questions": ["x" * 1000]}), 400, "at most 256 tokens"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (response.request.url, response.text[:300])
        assert message in response.json().get("error", ""), (response.request.url, response.json())
    assert client.get("/health").json() == {"status": "ok", "documents": 3}
    listed = client.get("/documents").json()["documents"]
    assert [d["metadata"].get("v") for d in listed] == [None] * 3


def test_a_bug_answers_500_and_keeps_the_connection(tmp_path):
    """A request that fails inside (a bug) gets a JSON 500; the same keep-alive connection then
    answers the next request (uvicorn closed it after Starlette's own 500 handler re-raised)."""
    import socket

    import uvicorn

    from mbc.server import create_app

    class Broken:
        bank = []

        def stats(self):
            raise RuntimeError("a bug")

    port = free_port()
    config = uvicorn.Config(create_app(Broken), host="127.0.0.1", port=port, log_level="critical")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not running.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            replies = []
            for path in ("/stats", "/health"):
                connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                replies.append(_read_response(connection))
        assert replies[0].startswith(b"HTTP/1.1 500") and b'"error":"internal error (RuntimeError: a bug)' in replies[0]
        assert b"connection: close" not in replies[0].lower()
        assert replies[1].startswith(b"HTTP/1.1 200") and b'"documents":0' in replies[1]
    finally:
        running.should_exit = True
        thread.join(10)


def _read_response(connection) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body

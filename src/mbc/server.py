"""`mbc serve`: an HTTP JSON API over one model and one bank (FastAPI + uvicorn).

    POST   /documents        {"documents": [{"text": ..., "metadata": {...}}]}   add (a batch)
    POST   /ask              {"questions": [...], "decoding": "greedy"}         answer (a batch)
    GET    /documents        ?offset=0&limit=100                                list
    GET    /documents/{id}                                                      one document's metadata
    DELETE /documents/{id}
    GET    /stats, /health;  OpenAPI docs at /docs

An add is acknowledged only after its transaction has committed, so a killed server keeps every
acknowledged document. The model and the bank live on one worker thread (torch already uses every
core for one request, and an SQLite connection belongs to the thread that opened it); requests
queue for it. Answers read the bank as it is when they run, including what another process
(`mbc ingest`, another replica on a PostgreSQL bank) appended. Every error is a JSON object
{"error": "..."} with a 4xx status (503 while a PostgreSQL bank's server is unreachable: try again;
500 only for a bug), and none stops the server. With a token, every route but the documentation (/docs,
/openapi.json: no data) needs it.

Every request must name this server in its Host header (an IP address, localhost, the address it
listens on, or a name given with --allowed-host): a web page the user visits could otherwise read
and write the bank through DNS rebinding, a name of the attacker's that resolves to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Annotated, Any, Callable, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, Field, StringConstraints
from starlette.exceptions import HTTPException

from mbc.bank import MAX_ID, metadata_json
from mbc.errors import MBCError, NotFound, Unavailable, check_encodable
from mbc.memory.service import MAX_QUESTION_CHARACTERS
from mbc.memory.sources import Document

TOKEN_VARIABLE = "MBC_TOKEN"
MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_BATCH = 256


def _valid(check):
    """A check of mbc's (raising MBCError) as a pydantic validator: its line becomes the 422's."""

    def validate(value):
        try:
            check(value)
        except MBCError as error:
            raise ValueError(str(error)) from None
        return value

    return AfterValidator(validate)


Text = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1), _valid(lambda t: check_encodable(t, "text"))
]
Question = Annotated[Text, StringConstraints(max_length=MAX_QUESTION_CHARACTERS)]
Metadata = Annotated[dict[str, Any], _valid(metadata_json)]  # finite numbers, nested at most 32 deep
DocumentId = Annotated[int, Path(ge=0, le=MAX_ID)]


class DocumentIn(BaseModel):
    text: Text
    metadata: Metadata = Field(default_factory=dict, description="stored beside the codes, returned on listing")


class AddRequest(BaseModel):
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_BATCH)


class AskRequest(BaseModel):
    questions: list[Question] = Field(min_length=1, max_length=MAX_BATCH)
    decoding: Literal["greedy", "beam", "diverse_beam"] = "greedy"
    max_new_tokens: int = Field(16, ge=1, le=256)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413, before any of it reaches the app."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._refuse(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = _error(413, f"request body over the limit of {self.limit:,} bytes: send smaller batches")
        await response(scope, receive, send)


class InternalErrors:
    """A bug's exception as a 500 JSON answer on a connection that stays open. (Starlette's own
    handler for ``Exception`` answers and then re-raises, and uvicorn then closes the connection: a
    client's next request on it was reset.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:  # noqa: BLE001 - any bug: answered, logged, the server goes on
            traceback.print_exc()
            if started:  # too late for another answer: the client sees the cut response
                raise
            message = f"internal error ({type(error).__name__}: {error}); the bank is unchanged by this request"
            await _error(500, message[:1000])(scope, receive, send)


class HostCheck:
    """Refuses (400) a request whose Host header names none of ``allowed`` and is no IP address. A
    DNS-rebinding page reaches the server only under a name of its own, never as an address, so
    addresses pass whatever the interface; ``"*"`` in ``allowed`` turns the check off (behind a proxy
    that checks hosts itself)."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or "*" in self.allowed:
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        name = _host_name(host)
        if name is None or not (name in self.allowed or _is_address(name)):
            names = ", ".join(sorted(self.allowed))
            response = _error(
                400,
                f"Host header {host[:100]!r} names no address or name this server answers to ({names}); "
                "start it with --allowed-host NAME to accept that name",
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _host_name(host: str) -> str | None:
    """The name or address of a Host header without its port, lower case; None if it is malformed."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 address, as in [::1]:8000
        name, closed, port = host[1:].partition("]")
        if not closed:
            return None
        port = port.removeprefix(":")
    else:
        name, _, port = host.partition(":")
    return name if name and (not port or port.isdigit()) else None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra=()) -> frozenset[str]:
    """The names a server bound to ``bind_host`` answers to: localhost, the bind address or name, and ``extra``."""
    return frozenset({"localhost", bind_host.strip().lower(), *(h.strip().lower() for h in extra)} - {""})


def check_token(token: str | None) -> str | None:
    """The token as given; an empty or blank one is refused rather than quietly serving without one."""
    if token is not None and not token.strip():
        raise MBCError(
            f"the token (--token or ${TOKEN_VARIABLE}) is empty: give a secret, e.g. $(openssl rand -hex 16), "
            f"or leave both out to serve without authentication"
        )
    return token


def create_app(
    open_service: Callable[[], Any],
    token: str | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    hosts: frozenset[str] = allowed_hosts("127.0.0.1"),
):
    """The API over the ``MemoryService`` that ``open_service()`` makes, on a worker thread of its own
    (opened here, so a bad model or bank fails before the server listens)."""
    token = check_token(token)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mbc-model")
    service = worker.submit(open_service).result()
    bearer = HTTPBearer(auto_error=False, description=f"the server's token (--token or ${TOKEN_VARIABLE})")

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        if credentials is None:
            raise ApiError(401, "this server needs a bearer token: send 'Authorization: Bearer TOKEN'")
        if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise ApiError(401, "wrong bearer token")

    app = FastAPI(
        title="MBC memory",
        description="A frozen LLM that answers from a compressed memory of the documents added to it.",
        dependencies=[Depends(authorize)],
    )
    app.add_middleware(InternalErrors)
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    app.add_middleware(HostCheck, allowed=hosts)

    async def on_worker(function, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(worker, partial(function, *args, **kwargs))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error.status, error.message)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, error: NotFound):
        return _error(404, str(error))

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, error: Unavailable):
        return _error(503, str(error))

    @app.exception_handler(MBCError)
    async def bad_request(request: Request, error: MBCError):
        return _error(400, str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        # FastAPI's own refusals (no such route, a body it could not parse) in this API's one shape
        message = str(error.detail)
        if error.status_code == 400 and "parsing the body" in message:
            message = "the request body is not valid JSON (malformed, or nested too deeply to parse)"
        return _error(error.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return _error(*_describe(error.errors()))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "documents": await on_worker(len, service.bank)}

    @app.get("/stats")
    async def stats() -> dict:
        return await on_worker(service.stats)

    @app.post("/documents")
    async def add(request: AddRequest) -> dict:
        report = await on_worker(service.add, [Document(d.text, d.metadata) for d in request.documents])
        return {"added": report.added, "duplicates": report.duplicates, "ids": report.ids}

    @app.post("/ask")
    async def ask(request: AskRequest) -> dict:
        from mbc.network.decoding import DecodingConfig

        decoding = DecodingConfig(request.decoding, max_new_tokens=request.max_new_tokens)
        return await on_worker(service.ask, request.questions, decoding)

    @app.get("/documents")
    async def listing(offset: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(100, ge=1, le=1000)) -> dict:
        return {"documents": await on_worker(service.listing, offset, limit), "offset": offset}

    @app.get("/documents/{document_id}")
    async def document(document_id: DocumentId) -> dict:
        return await on_worker(service.document, document_id)

    @app.delete("/documents/{document_id}")
    async def delete(document_id: DocumentId) -> dict:
        await on_worker(service.delete, document_id)
        return {"deleted": document_id}

    app.state.worker, app.state.service = worker, service
    return app


def _describe(errors: list[dict]) -> tuple[int, str]:
    """FastAPI's validation errors as one status and line: 400 for a body that is not JSON, else 422."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return 400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return 422, f"{where}: {first.get('msg', 'invalid')}{more}"


def serve(
    bank: str,
    model: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    extra_hosts=(),
) -> None:
    """Run the API until interrupted. The token defaults to ``$MBC_TOKEN``; none: no authentication."""
    import uvicorn

    from mbc.memory.service import MemoryService

    token = check_token(token if token is not None else os.environ.get(TOKEN_VARIABLE))
    hosts = allowed_hosts(host, extra_hosts)
    from mbc.pipeline import model_or_default

    model = model_or_default(model, say=lambda line: print(line, file=sys.stderr))
    app = create_app(partial(MemoryService.open, bank, model), token, max_request_bytes, hosts)
    uvicorn.run(app, host=host, port=port, log_level="info")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(
    bank, model, port: int, token: str | None = None, timeout: float = 180, extra=(), env: dict | None = None
) -> subprocess.Popen:
    """`mbc serve` in a child process on 127.0.0.1:port, returned once it answers (for tests and
    benches); ``env``: variables set for it beside this process's."""
    import httpx

    env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE} | (env or {})
    env |= {TOKEN_VARIABLE: token} if token else {}
    command = [sys.executable, "-m", "mbc.cli", "serve", str(bank), "--model", str(model), "--port", str(port)]
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe nobody reads would stall the server
    process = subprocess.Popen([*command, *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise MBCError(f"the server exited: {log.read().decode(errors='replace')[-3000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise MBCError(f"the server did not answer within {timeout:.0f} s")

"""A simulated Ollama server for the ``demo`` command, the tests and the benchmark.

It answers Ollama's native API and its OpenAI layer with the real server's
framing, headers and quirks (Go JSON, NDJSON and SSE flushed per frame,
``omitempty`` metrics, errors in each endpoint's shape), generates
deterministic text, and records every request so tests can see what the
backend saw: tokens sent, and whether the request completed, failed, was
dropped or was cancelled by its client.

A test steers one request with directives written anywhere in its prompt,
messages or embedding input::

    [[sim:tokens=N]]       say N completion tokens (default: ``default_tokens``)
    [[sim:delay=S]]        wait S seconds before the first byte (a model load)
    [[sim:rate=T]]         T tokens per second (0 = as fast as possible)
    [[sim:error_after=N]]  N frames, then Ollama's mid-stream error
    [[sim:drop_after=N]]   N frames, then drop the connection
    [[sim:status=CODE]]    answer CODE before any frame, in the endpoint's error shape

This module holds the ``Simulator`` itself (records, dispatch, whole replies,
loaded models); its endpoints live in ``sim.generation`` (generation and
embeddings) and ``sim.catalogue_endpoints`` (model management). The pure parts
live in ``sim.text`` (Go JSON, words, directives), ``sim.frames`` (the
dialects' bytes), ``sim.models`` (the catalogue) and ``sim.requests`` (reading
requests as Ollama does).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..http.clientip import AddressPolicy
from ..http.messages import Request
from ..http.responder import ClientGone, Responder
from ..http.server import HttpServer, ServerSettings
from .catalogue_endpoints import CatalogueEndpoints
from .frames import JSON_CT, Api, error_body
from .generation import GenerationEndpoints
from .models import DEFAULT_KEEP_ALIVE_NS, DEFAULT_MODELS, SimModel, normalize_name
from .requests import Body, Refusal, allowed, decode, status_message
from .text import go_json, now_ns

VERSION = "0.33.0"
TEXT_CT = b"text/plain; charset=utf-8"
GIN_TEXT_CT = b"text/plain"  # gin's own 404/405 bodies
# Go's response buffer: a reply that fits gets Content-Length, a bigger one is chunked.
GO_CHUNKING_THRESHOLD = 2048
# Where tokens are spent: the requests ``counts()`` totals.
METERED_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }
)


@dataclass(slots=True)
class SimRecord:
    """What the simulator saw of one request, updated as it runs.

    ``outcome`` goes from ``pending`` to ``completed``, ``cancelled`` (the
    client left), ``error`` (Ollama's model error was sent), ``dropped`` (the
    connection was cut) or ``refused`` (an error status was answered).
    ``completion_tokens`` counts the frames actually sent.
    """

    id: int
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: Any = None  # parsed JSON; None when absent or invalid
    model: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    outcome: str = "pending"
    status: int = 0  # the HTTP status answered; 0 before the head


# What answers one method on one path.
Endpoint = Callable[[Request, Responder, SimRecord], Awaitable[None]]


class Simulator:
    """The fake Ollama; ``handle`` is an ``HttpServer`` handler."""

    def __init__(
        self,
        *,
        models: Sequence[SimModel] = DEFAULT_MODELS,
        tokens_per_s: float = 0.0,
        first_byte_delay_s: float = 0.0,
        default_tokens: int = 12,
        embedding_dim: int = 16,
        max_records: int | None = None,
    ) -> None:
        self.models = {normalize_name(model.name): model for model in models}
        self.max_records = max_records  # None keeps all (tests); benchmarks keep the newest few
        self.tokens_per_s = tokens_per_s
        self.first_byte_delay_s = first_byte_delay_s
        self.default_tokens = default_tokens
        self.embedding_dim = embedding_dim
        # Set: every generation and embedding is answered this status at once (an
        # overloaded Ollama answers 503 so); the other paths still answer.
        self.refuse_status: int | None = None
        self.records: list[SimRecord] = []
        self._served = 0
        self._changed = trio.lowlevel.ParkingLot()
        # Loaded models, name -> expiry (ns); the first chat model starts warm.
        self._loaded: dict[str, int] = {}
        warm = next((key for key, model in self.models.items() if model.generates), None)
        if warm is not None:
            self._loaded[warm] = now_ns() + DEFAULT_KEEP_ALIVE_NS
        catalogue, generation = CatalogueEndpoints(self), GenerationEndpoints(self)
        self._endpoints: dict[str, dict[str, Endpoint]] = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": catalogue.tags, "HEAD": catalogue.tags},
            "/api/ps": {"GET": catalogue.ps},
            "/api/show": {"POST": catalogue.show},
            "/api/generate": {"POST": generation.generation},
            "/api/chat": {"POST": generation.generation},
            "/api/embed": {"POST": generation.embed},
            "/api/embeddings": {"POST": generation.embeddings},
            "/api/pull": {"POST": catalogue.pull},
            "/api/copy": {"POST": catalogue.copy},
            "/api/delete": {"DELETE": catalogue.delete},
            "/v1/chat/completions": {"POST": generation.generation},
            "/v1/completions": {"POST": generation.generation},
            "/v1/embeddings": {"POST": generation.v1_embeddings},
            "/v1/models": {"GET": catalogue.v1_models},
        }
        self._model_endpoints: dict[str, Endpoint] = {"GET": catalogue.v1_model}

    # ------------------------------------------------------------------ records

    def notify(self) -> None:
        """Wake ``wait_for``: call after changing a record."""
        self._changed.unpark_all()

    def finish(self, record: SimRecord, outcome: str) -> None:
        """Record how ``record`` ended (see ``SimRecord``)."""
        record.outcome = outcome
        self.notify()

    async def wait_for(
        self, predicate: Callable[[Simulator], bool], timeout_s: float = 5.0
    ) -> None:
        """Return once ``predicate(self)`` holds (checked on every record change).

        Raises ``TimeoutError`` after ``timeout_s``.
        """
        try:
            with trio.fail_after(timeout_s):
                while not predicate(self):
                    await self._changed.park()
        except trio.TooSlowError:
            raise TimeoutError(f"simulator condition not met within {timeout_s} s") from None

    def counts(self) -> dict[str, int]:
        """Totals over completed generation and embedding requests."""
        done = [r for r in self.records if r.outcome == "completed" and r.path in METERED_PATHS]
        return {
            "requests": len(done),
            "prompt_tokens": sum(r.prompt_tokens for r in done),
            "completion_tokens": sum(r.completion_tokens for r in done),
        }

    # ------------------------------------------------------------------ HTTP

    async def handle(self, request: Request, responder: Responder) -> None:
        self._served += 1
        record = SimRecord(self._served, request.method, request.path, request.headers)
        self.records.append(record)
        if self.max_records is not None and len(self.records) > 2 * self.max_records:
            del self.records[: -self.max_records]
        self.notify()
        try:
            await request.read_body()  # the simulator wants every body
            await self._dispatch(request, responder, record)
        except (trio.Cancelled, ClientGone):
            if record.outcome == "pending":
                self.finish(record, "cancelled")
            raise

    async def _dispatch(self, request: Request, responder: Responder, record: SimRecord) -> None:
        endpoints = self._endpoints.get(request.path)
        if endpoints is None and request.path.startswith("/v1/models/"):
            endpoints = self._model_endpoints
        # gin's own answers: the bare 403 of the Host/CORS checks, text/plain 404/405.
        if not allowed(request.header(b"host"), request.header(b"origin")):
            await self.send(responder, record, 403, b"", None, "refused")
        elif endpoints is None:
            await self.send(responder, record, 404, b"404 page not found", GIN_TEXT_CT, "refused")
        elif request.method not in endpoints:
            text = b"405 method not allowed"
            await self.send(responder, record, 405, text, GIN_TEXT_CT, "refused")
        elif self.refuse_status is not None and request.path in METERED_PATHS:
            api = Api.OPENAI if request.path.startswith("/v1/") else Api.NATIVE
            status = self.refuse_status
            content_type, body = error_body(api, status, status_message(status, ""))
            await self.send(responder, record, status, body, content_type, "refused")
        else:
            try:
                await endpoints[request.method](request, responder, record)
            except Refusal as refusal:
                content_type, body = error_body(
                    refusal.api, refusal.status, refusal.message, early=refusal.early
                )
                await self.send(
                    responder, record, refusal.status, body, content_type, refusal.outcome
                )

    # ------------------------------------------------------------------ replies

    async def send(
        self,
        responder: Responder,
        record: SimRecord,
        status: int,
        body: bytes,
        content_type: bytes | None = JSON_CT,
        outcome: str = "completed",
    ) -> None:
        """A whole reply, framed as Go frames it: Content-Length when small, else chunked."""
        record.status = status
        headers = [] if content_type is None else [(b"content-type", content_type)]
        if len(body) < GO_CHUNKING_THRESHOLD:
            await responder.start(status, headers, length=len(body))
            await self.last(responder, record, outcome, body, chunked=False)
            return
        await responder.start(status, headers)
        pieces = [
            body[at : at + GO_CHUNKING_THRESHOLD]
            for at in range(0, len(body), GO_CHUNKING_THRESHOLD)
        ]
        for piece in pieces[:-1]:
            await responder.write(piece)
        await self.last(responder, record, outcome, pieces[-1], chunked=True)

    async def last(
        self, responder: Responder, record: SimRecord, outcome: str, data: bytes, *, chunked: bool
    ) -> None:
        """Write the last bytes and end the body, with ``outcome`` recorded first.

        A client may act on the bytes before this task runs again, so the
        record must already say how the request ended; it turns to
        ``cancelled`` if those bytes (or, when chunked, the end marker) never
        left. A Content-Length body is complete without its end marker.
        """
        self.finish(record, outcome)
        try:
            await responder.write(data)
            if chunked:
                await responder.end()
        except (trio.Cancelled, ClientGone):
            self.finish(record, "cancelled")
            raise
        if not chunked:
            await responder.end()

    async def open_stream(
        self, responder: Responder, record: SimRecord, content_type: bytes
    ) -> None:
        """Start a streamed 200 reply (chunked); ``last`` ends it."""
        record.status = 200
        await responder.start(200, [(b"content-type", content_type)])

    def decode(self, request: Request, record: SimRecord, api: Api, go_type: str) -> Body:
        """The body read as Ollama reads it into ``go_type``; the record keeps the JSON."""
        record.body, body = decode(request.body, api, go_type)
        return body

    # ------------------------------------------------------------------ loaded models

    def touch(self, model: SimModel, keep_ns: int | None) -> None:
        """Mark ``model`` loaded until now + keep_alive; keep_alive 0 unloads it."""
        if keep_ns == 0:
            self.unload(model.name)
        else:
            key = normalize_name(model.name)
            self._loaded[key] = now_ns() + (DEFAULT_KEEP_ALIVE_NS if keep_ns is None else keep_ns)

    def unload(self, name: str) -> None:
        """Forget that ``name`` is loaded (if it was)."""
        self._loaded.pop(normalize_name(name), None)

    def loaded_models(self) -> list[tuple[SimModel, int]]:
        """The installed models still loaded, with their expiry (ns), latest expiry first."""
        now = now_ns()
        live = [
            (expiry, key)
            for key, expiry in self._loaded.items()
            if expiry > now and key in self.models
        ]
        return [(self.models[key], expiry) for expiry, key in sorted(live, reverse=True)]

    # ------------------------------------------------------------------ the server itself

    async def _root(self, request: Request, responder: Responder, record: SimRecord) -> None:
        await self.send(responder, record, 200, b"Ollama is running", TEXT_CT)

    async def _version(self, request: Request, responder: Responder, record: SimRecord) -> None:
        await self.send(responder, record, 200, go_json({"version": VERSION}))


# The simulated backend's own server limits. A real Ollama has none of these; they only
# need to be no tighter than what the gateway forwards (its default body and head caps)
# and to keep a connection longer than the gateway's pool does (60 s).
SERVER_SETTINGS = ServerSettings(
    max_body_bytes=64 * 1024 * 1024,
    max_header_bytes=64 * 1024,
    header_timeout_s=30.0,
    keepalive_timeout_s=75.0,
    body_timeout_s=60.0,
    send_timeout_s=60.0,
    max_connections=1024,
    max_connections_per_ip=256,
    addresses=AddressPolicy(),
)


async def run_simulator(
    sim: Simulator,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` on ``host:port`` (0 = any free port) until cancelled.

    ``task_status.started`` reports the bound ``(host, port)``.
    """
    server = HttpServer(sim.handle, SERVER_SETTINGS)
    await server.serve(host, port, task_status=task_status)

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

The pure parts live in ``sim.text`` (Go JSON, words, directives),
``sim.frames`` (the dialects' bytes), ``sim.models`` (the catalogue) and
``sim.requests`` (reading requests as Ollama does).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..http.server import ClientGone, HttpServer, Request, Responder, ServerSettings
from .catalogue_endpoints import CatalogueEndpoints
from .frames import (
    JSON_CT,
    MODEL_ERROR,
    OPENAI_JSON_CT,
    Api,
    Dialect,
    Stats,
    Token,
    error_body,
    plan_tokens,
)
from .models import (
    DEFAULT_KEEP_ALIVE_NS,
    DEFAULT_MODELS,
    SimModel,
    normalize_name,
)
from .requests import (
    GENERATION_READERS,
    Body,
    Generation,
    Refusal,
    allowed,
    decode,
    directives_in,
    embed_inputs,
    embed_tokens,
    find_model,
    status_message,
)
from .text import Directives, GoFloats, context_ids, embed_vector, go_json, now_ns

VERSION = "0.33.0"
TEXT_CT = b"text/plain; charset=utf-8"
GIN_TEXT_CT = b"text/plain"  # gin's own 404/405 bodies
# Go's response buffer: a reply that fits gets Content-Length, a bigger one is chunked.
GO_CHUNKING_THRESHOLD = 2048
# Prompt evaluation is reported, not slept: a nominal 20k tokens/s.
PROMPT_EVAL_NS_PER_TOKEN = 50_000
# Anything that happened took some time, so its duration is never omitted as zero.
MIN_DURATION_NS = 1_000
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
        self.records: list[SimRecord] = []
        self._served = 0
        self._changed = trio.lowlevel.ParkingLot()
        # Loaded models, name -> expiry (ns); the first chat model starts warm.
        self._loaded: dict[str, int] = {}
        warm = next((key for key, model in self.models.items() if model.generates), None)
        if warm is not None:
            self._loaded[warm] = now_ns() + DEFAULT_KEEP_ALIVE_NS
        catalogue = CatalogueEndpoints(self)
        self._endpoints: dict[str, dict[str, Endpoint]] = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": catalogue.tags, "HEAD": catalogue.tags},
            "/api/ps": {"GET": catalogue.ps},
            "/api/show": {"POST": catalogue.show},
            "/api/generate": {"POST": self._generation},
            "/api/chat": {"POST": self._generation},
            "/api/embed": {"POST": self._embed},
            "/api/embeddings": {"POST": self._embeddings},
            "/api/pull": {"POST": catalogue.pull},
            "/api/copy": {"POST": catalogue.copy},
            "/api/delete": {"DELETE": catalogue.delete},
            "/v1/chat/completions": {"POST": self._generation},
            "/v1/completions": {"POST": self._generation},
            "/v1/embeddings": {"POST": self._v1_embeddings},
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

    async def _load(self, directives: Directives) -> None:
        delay = self.first_byte_delay_s if directives.delay is None else directives.delay
        if delay > 0:
            await trio.sleep(delay)

    # ------------------------------------------------------------------ the server itself

    async def _root(self, request: Request, responder: Responder, record: SimRecord) -> None:
        await self.send(responder, record, 200, b"Ollama is running", TEXT_CT)

    async def _version(self, request: Request, responder: Responder, record: SimRecord) -> None:
        await self.send(responder, record, 200, go_json({"version": VERSION}))

    # ------------------------------------------------------------------ generation endpoints

    async def _generation(self, request: Request, responder: Responder, record: SimRecord) -> None:
        api, go_type, reader = GENERATION_READERS[request.path]
        body = self.decode(request, record, api, go_type)
        record.model, record.stream = body.text("model"), body.stream()
        generation = reader(body, self.models, record.id)
        if generation.load_only:
            await self._load_only(responder, record, generation)
        else:
            await self._run(responder, record, generation)

    async def _load_only(self, responder: Responder, record: SimRecord, gen: Generation) -> None:
        """No prompt: load (or, with keep_alive 0, unload) the model; one JSON reply."""
        await self._load(Directives())
        self.touch(gen.model, gen.keep_alive_ns)
        reason = "unload" if gen.keep_alive_ns == 0 else "load"
        content_type, body = gen.dialect.whole([], Stats(0, 0, reason))
        await self.send(responder, record, 200, body, content_type)

    async def _run(self, responder: Responder, record: SimRecord, gen: Generation) -> None:
        """Load, then answer or stream the tokens, failing where the directives say."""
        directives, dialect = gen.directives, gen.dialect
        record.prompt_tokens = gen.prompt_tokens
        self.notify()
        started = trio.current_time()
        await self._load(directives)
        loaded = trio.current_time()
        if directives.status is not None:
            message = status_message(directives.status, dialect.model)
            raise Refusal(directives.status, message, dialect.api)
        self.touch(gen.model, gen.keep_alive_ns)
        natural = self.default_tokens if directives.tokens is None else directives.tokens
        tokens, reason = plan_tokens(gen.prompt, natural, gen.cap, gen.thinking)
        rate = self.tokens_per_s if directives.rate is None else directives.rate
        interval = 1.0 / rate if rate > 0 else 0.0
        sent, failure = _failure_point(directives, len(tokens))

        def stats(count: int) -> Stats:  # timed when the last token is out
            return _stats(gen, count, reason, started, loaded)

        if gen.stream:
            await self._stream(responder, record, dialect, tokens[:sent], interval, failure, stats)
            return
        if sent and interval:
            await trio.sleep(sent * interval)  # the time the tokens would take
        if failure == "drop":
            self.finish(record, "dropped")
            await responder.abort()
            return
        if failure == "error":
            raise Refusal(500, MODEL_ERROR, dialect.api, outcome="error")
        record.completion_tokens = len(tokens)
        content_type, body = dialect.whole(tokens, stats(len(tokens)))
        await self.send(responder, record, 200, body, content_type)

    async def _stream(
        self,
        responder: Responder,
        record: SimRecord,
        dialect: Dialect,
        tokens: list[Token],
        interval: float,
        failure: str | None,
        stats: Callable[[int], Stats],
    ) -> None:
        """One frame per token, ``interval`` apart, then the end ``failure`` asks for."""
        await self.open_stream(responder, record, dialect.stream_type)
        for index, token in enumerate(tokens):
            if index and interval:
                await trio.sleep(interval)
            record.completion_tokens += 1  # counted before the client can see it
            self.notify()
            try:
                await responder.write(dialect.frame(token, index == 0))
            except (trio.Cancelled, ClientGone):
                record.completion_tokens -= 1  # it never left
                raise
        if tokens and interval:
            await trio.sleep(interval)
        if failure == "drop":
            self.finish(record, "dropped")
            await responder.abort()
            return
        if failure == "error":
            pieces = dialect.stream_error(not tokens)
        else:
            pieces = dialect.closing(stats(len(tokens)))
        for piece in pieces[:-1]:
            await responder.write(piece)
        outcome = "error" if failure else "completed"
        await self.last(responder, record, outcome, pieces[-1], chunked=True)

    # ------------------------------------------------------------------ embeddings

    async def _vectors(
        self,
        record: SimRecord,
        model: SimModel,
        texts: list[str],
        dimensions: int | None,
        api: Api,
    ) -> tuple[list[list[float]], int, int]:
        """Vectors for ``texts`` after the load: ``(vectors, total_ns, load_ns)``."""
        directives = directives_in("\n".join(texts), api)
        record.prompt_tokens = embed_tokens(texts)
        self.notify()
        started = trio.current_time()
        await self._load(directives)
        load_ns = _ns(trio.current_time() - started)
        if directives.status is not None:
            message = status_message(directives.status, record.model or "")
            raise Refusal(directives.status, message, api)
        self.touch(model, None)
        dim = self.embedding_dim
        if dimensions is not None and 0 < dimensions < dim:
            dim = int(dimensions)
        vectors = [embed_vector(text, dim) for text in texts]
        return vectors, _ns(trio.current_time() - started), load_ns

    async def _embed(self, request: Request, responder: Responder, record: SimRecord) -> None:
        body = self.decode(request, record, Api.NATIVE, "api.EmbedRequest")
        record.model = name = body.text("model")
        model = find_model(self.models, name, Api.NATIVE)
        texts = embed_inputs(body.data.get("input"), Api.NATIVE)
        if not texts:  # nothing to embed: just load
            await self._load(Directives())
            await self.send(responder, record, 200, go_json({"model": name, "embeddings": []}))
            return
        dimensions = body.get("dimensions", "int")
        vectors, total_ns, load_ns = await self._vectors(
            record, model, texts, dimensions, Api.NATIVE
        )
        stats = Stats(record.prompt_tokens, 0, "", total_ns=total_ns, load_ns=load_ns)
        embeddings = [GoFloats(tuple(vector)) for vector in vectors]
        reply = {"model": name, "embeddings": embeddings, **stats.metrics()}
        await self.send(responder, record, 200, go_json(reply))

    async def _embeddings(self, request: Request, responder: Responder, record: SimRecord) -> None:
        body = self.decode(request, record, Api.NATIVE, "api.EmbeddingRequest")
        record.model, prompt = body.text("model"), body.text("prompt")
        model = find_model(self.models, record.model, Api.NATIVE)
        vector: tuple[float, ...] = ()
        if prompt:
            vectors, _, _ = await self._vectors(record, model, [prompt], None, Api.NATIVE)
            vector = tuple(vectors[0])
        else:
            await self._load(Directives())
        legacy = GoFloats(vector, f32=False)  # []float64: the float32 values, widened
        await self.send(responder, record, 200, go_json({"embedding": legacy}))

    async def _v1_embeddings(
        self, request: Request, responder: Responder, record: SimRecord
    ) -> None:
        body = self.decode(request, record, Api.OPENAI, "openai.EmbedRequest")
        encoding = body.text("encoding_format").lower()
        if encoding not in ("", "float", "base64"):
            message = (
                f"Invalid value for 'encoding_format' = {body.text('encoding_format')}. "
                "Supported values: ['float', 'base64']."
            )
            raise Refusal(400, message, Api.OPENAI, early=True)
        raw_input = body.data.get("input")
        if raw_input is None or raw_input == []:
            raise Refusal(400, "invalid input", Api.OPENAI, early=True)
        record.model = name = body.text("model")
        model = find_model(self.models, name, Api.OPENAI)
        texts = embed_inputs([""] if raw_input == "" else raw_input, Api.OPENAI)
        dimensions = body.get("dimensions", "int")
        vectors, _, _ = await self._vectors(record, model, texts, dimensions, Api.OPENAI)
        data = [
            {
                "object": "embedding",
                "embedding": (
                    _base64_f32(vector) if encoding == "base64" else GoFloats(tuple(vector))
                ),
                "index": index,
            }
            for index, vector in enumerate(vectors)
        ]
        usage = {"prompt_tokens": record.prompt_tokens, "total_tokens": record.prompt_tokens}
        reply = go_json({"object": "list", "data": data, "model": name, "usage": usage})
        await self.send(responder, record, 200, reply + b"\n", OPENAI_JSON_CT)


def _ns(seconds: float) -> int:
    return max(MIN_DURATION_NS, round(seconds * 1e9))


def _stats(gen: Generation, count: int, reason: str, started: float, loaded: float) -> Stats:
    now = trio.current_time()
    prompt_eval_ns = gen.prompt_tokens * PROMPT_EVAL_NS_PER_TOKEN
    context = context_ids(gen.prompt, gen.prompt_tokens + count) if gen.with_context else None
    return Stats(
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=count,
        done_reason=reason,
        total_ns=_ns(now - started) + prompt_eval_ns,
        load_ns=_ns(loaded - started),
        prompt_eval_ns=prompt_eval_ns,
        eval_ns=_ns(now - loaded) if count else 0,
        context=context,
    )


def _failure_point(directives: Directives, count: int) -> tuple[int, str | None]:
    """Frames to send, and what follows them: None (the normal end), error or drop."""
    points = [
        (min(after, count), kind)
        for after, kind in ((directives.drop_after, "drop"), (directives.error_after, "error"))
        if after is not None
    ]
    if not points:
        return count, None
    sent, kind = min(points)  # the earlier one wins; on a tie, the drop
    return sent, kind


def _base64_f32(vector: list[float]) -> str:
    """Little-endian float32 bytes in base64: what the openai client decodes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


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
    server = HttpServer(sim.handle, ServerSettings())
    await server.serve(host, port, task_status=task_status)

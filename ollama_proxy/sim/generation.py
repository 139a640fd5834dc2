"""The simulated Ollama's generation and embedding endpoints: the model load,
the tokens (whole or streamed, paced, cut short where a directive says) and
their stats, and the vectors in each API's shape."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..http.messages import Request
from ..http.responder import ClientGone, Responder
from .frames import MODEL_ERROR, OPENAI_JSON_CT, Api, Dialect, Stats, Token, plan_tokens
from .models import SimModel
from .requests import (
    GENERATION_READERS,
    Generation,
    Refusal,
    directives_in,
    embed_inputs,
    embed_tokens,
    find_model,
    status_message,
)
from .text import Directives, GoFloats, context_ids, embed_vector, go_json

if TYPE_CHECKING:
    from .server import SimRecord, Simulator

# Prompt evaluation is reported, not slept: a nominal 20k tokens/s.
PROMPT_EVAL_NS_PER_TOKEN = 50_000
# Anything that happened took some time, so its duration is never omitted as zero.
MIN_DURATION_NS = 1_000


class GenerationEndpoints:
    """The endpoints that load a model and spend tokens on it."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def _load(self, directives: Directives) -> None:
        """Take as long as loading the model: the directive's delay, else the simulator's."""
        delay = self.sim.first_byte_delay_s if directives.delay is None else directives.delay
        if delay > 0:
            await trio.sleep(delay)

    # ------------------------------------------------------------------ generation

    async def generation(self, request: Request, responder: Responder, record: SimRecord) -> None:
        api, go_type, reader = GENERATION_READERS[request.path]
        body = self.sim.decode(request, record, api, go_type)
        record.model, record.stream = body.text("model"), body.stream()
        generation = reader(body, self.sim.models, record.id)
        if generation.load_only:
            await self._load_only(responder, record, generation)
        else:
            await self._run(responder, record, generation)

    async def _load_only(self, responder: Responder, record: SimRecord, gen: Generation) -> None:
        """No prompt: load (or, with keep_alive 0, unload) the model; one JSON reply."""
        await self._load(Directives())
        self.sim.touch(gen.model, gen.keep_alive_ns)
        reason = "unload" if gen.keep_alive_ns == 0 else "load"
        content_type, body = gen.dialect.whole([], Stats(0, 0, reason))
        await self.sim.send(responder, record, 200, body, content_type)

    async def _run(self, responder: Responder, record: SimRecord, gen: Generation) -> None:
        """Load, then answer or stream the tokens, failing where the directives say."""
        directives, dialect = gen.directives, gen.dialect
        record.prompt_tokens = gen.prompt_tokens
        self.sim.notify()
        started = trio.current_time()
        await self._load(directives)
        loaded = trio.current_time()
        if directives.status is not None:
            message = status_message(directives.status, dialect.model)
            raise Refusal(directives.status, message, dialect.api)
        self.sim.touch(gen.model, gen.keep_alive_ns)
        natural = self.sim.default_tokens if directives.tokens is None else directives.tokens
        tokens, reason = plan_tokens(gen.prompt, natural, gen.cap, gen.thinking)
        rate = self.sim.tokens_per_s if directives.rate is None else directives.rate
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
            self.sim.finish(record, "dropped")
            await responder.abort()
            return
        if failure == "error":
            raise Refusal(500, MODEL_ERROR, dialect.api, outcome="error")
        record.completion_tokens = len(tokens)
        content_type, body = dialect.whole(tokens, stats(len(tokens)))
        await self.sim.send(responder, record, 200, body, content_type)

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
        await self.sim.open_stream(responder, record, dialect.stream_type)
        for index, token in enumerate(tokens):
            if index and interval:
                await trio.sleep(interval)
            record.completion_tokens += 1  # counted before the client can see it
            self.sim.notify()
            try:
                await responder.write(dialect.frame(token, index == 0))
            except (trio.Cancelled, ClientGone):
                record.completion_tokens -= 1  # it never left
                raise
        if tokens and interval:
            await trio.sleep(interval)
        if failure == "drop":
            self.sim.finish(record, "dropped")
            await responder.abort()
            return
        if failure == "error":
            pieces = dialect.stream_error(not tokens)
        else:
            pieces = dialect.closing(stats(len(tokens)))
        for piece in pieces[:-1]:
            await responder.write(piece)
        outcome = "error" if failure else "completed"
        await self.sim.last(responder, record, outcome, pieces[-1], chunked=True)

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
        self.sim.notify()
        started = trio.current_time()
        await self._load(directives)
        load_ns = _ns(trio.current_time() - started)
        if directives.status is not None:
            message = status_message(directives.status, record.model or "")
            raise Refusal(directives.status, message, api)
        self.sim.touch(model, None)
        dim = self.sim.embedding_dim
        if dimensions is not None and 0 < dimensions < dim:
            dim = int(dimensions)
        vectors = [embed_vector(text, dim) for text in texts]
        return vectors, _ns(trio.current_time() - started), load_ns

    async def embed(self, request: Request, responder: Responder, record: SimRecord) -> None:
        body = self.sim.decode(request, record, Api.NATIVE, "api.EmbedRequest")
        record.model = name = body.text("model")
        model = find_model(self.sim.models, name, Api.NATIVE)
        texts = embed_inputs(body.data.get("input"), Api.NATIVE)
        if not texts:  # nothing to embed: just load
            await self._load(Directives())
            await self.sim.send(responder, record, 200, go_json({"model": name, "embeddings": []}))
            return
        dimensions = body.get("dimensions", "int")
        vectors, total_ns, load_ns = await self._vectors(
            record, model, texts, dimensions, Api.NATIVE
        )
        stats = Stats(record.prompt_tokens, 0, "", total_ns=total_ns, load_ns=load_ns)
        embeddings = [GoFloats(tuple(vector)) for vector in vectors]
        reply = {"model": name, "embeddings": embeddings, **stats.metrics()}
        await self.sim.send(responder, record, 200, go_json(reply))

    async def embeddings(self, request: Request, responder: Responder, record: SimRecord) -> None:
        body = self.sim.decode(request, record, Api.NATIVE, "api.EmbeddingRequest")
        record.model, prompt = body.text("model"), body.text("prompt")
        model = find_model(self.sim.models, record.model, Api.NATIVE)
        vector: tuple[float, ...] = ()
        if prompt:
            vectors, _, _ = await self._vectors(record, model, [prompt], None, Api.NATIVE)
            vector = tuple(vectors[0])
        else:
            await self._load(Directives())
        legacy = GoFloats(vector, f32=False)  # []float64: the float32 values, widened
        await self.sim.send(responder, record, 200, go_json({"embedding": legacy}))

    async def v1_embeddings(
        self, request: Request, responder: Responder, record: SimRecord
    ) -> None:
        body = self.sim.decode(request, record, Api.OPENAI, "openai.EmbedRequest")
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
        model = find_model(self.sim.models, name, Api.OPENAI)
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
        await self.sim.send(responder, record, 200, reply + b"\n", OPENAI_JSON_CT)


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

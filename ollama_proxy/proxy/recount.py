"""Exact counts for streams a backend did not count, after they ended (trio shell
over ``api.tokenizer``).

llama.cpp servers ignore ``stream_options.include_usage``: their streams end
without counts and their rows are estimated. When such a stream starts, the
relay asks ``capture_bytes`` how much of it to keep (nothing for backends
known to report stream usage: learned per backend and route from the first
finished stream, so Ollama and vLLM pay once). When it has ended and its row is
durable, ``ended`` queues a job here: the backend's tokenize endpoint (found
once per backend, a backend without one remembered) counts the prompt and the
streamed text; exact counts go to the ledger (``amend``) and to the
``on_exact`` hooks (the limits). For a non-streamed chat, ``ended`` learns
what a text-only tokenizer's chat template adds from the backend's own counts.

Bounded and never in the way: at most ``MAX_IN_FLIGHT`` jobs per backend talk
to it at once, ``MAX_QUEUED`` wait, each job has ``JOB_TIMEOUT_S``; a failure
is logged and the estimate stays. Nothing here is awaited by a request, and
the jobs are cancelled with the gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import trio

from ..api.exchange import Exchange
from ..api.prompt_overhead import TEXT, PromptOverheads, prompt_shape
from ..api.record import RequestRecord
from ..api.routes import Text
from ..api.tokenizer import (
    Call,
    CountError,
    Counting,
    Dialect,
    Tokenizer,
    discover,
    parse_answer,
    stream_counts,
    template_overhead,
)
from ..api.usage import StreamScanner, estimate_prompt_tokens
from ..backends.registry import Backend
from ..errors import ProxyError

log = logging.getLogger("ollama_proxy.recount")

CAPTURE_BYTES = 4 << 20  # a stream longer than this keeps its estimate
MAX_IN_FLIGHT = 2  # jobs talking to one backend at once
MAX_QUEUED = 64  # jobs queued or running for one backend; more are dropped (estimate kept)
JOB_TIMEOUT_S = 10.0  # a busy llama-cpp-python answers behind its running generation
RETRY_DISCOVERY_S = 60.0  # after a failed discovery (not a 404), ask again this much later
MAX_ANSWER_BYTES = 1 << 20  # /extras/tokenize lists every token of a long text

Amend = Callable[[RequestRecord, int, int], Awaitable[None]]
ExactHook = Callable[[Exchange, RequestRecord, int, int], None]
_UNKNOWN = object()  # the backend's tokenizer was not looked for yet


class _BackendState:
    """What is known of one backend's counting."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.basis = f"tokenizer:{backend.name}"  # its learned overheads' basis
        self.tokenizer: Any = _UNKNOWN  # Tokenizer, or None: it has none
        self.retry_at = float("-inf")
        self.reports_usage: dict[str, bool] = {}  # route -> its finished streams had usage
        self.slots = trio.CapacityLimiter(MAX_IN_FLIGHT)
        self.discovering = trio.Lock()
        self.jobs = 0


class Recounter:
    """The counting jobs of every backend whose ``tokenize`` setting is ``auto``."""

    def __init__(self, backends: Sequence[Backend], enabled: Sequence[str],
                 overheads: PromptOverheads, amend: Amend,
                 on_exact: Sequence[ExactHook] = ()) -> None:
        self._states: dict[str, _BackendState] = {}
        self.set_backends(backends, enabled)
        self._overheads = overheads
        self._amend = amend
        self._on_exact = tuple(on_exact)
        self._nursery: trio.Nursery | None = None
        self.running = 0  # countings under way (stats, tests)
        self._idle = trio.Event()
        self._idle.set()
        self.amended = 0  # rows made exact (stats, tests)
        self.failed = 0

    def set_backends(self, backends: Sequence[Backend], enabled: Sequence[str]) -> None:
        """A reload's backends: one kept unchanged keeps what was learned of it."""
        known = {state.backend: state for state in self._states.values()}
        self._states = {b.name: known.get(b) or _BackendState(b) for b in backends
                        if b.name in enabled}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the jobs until cancelled (they go with it)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def idle(self) -> None:
        """Return once no job is queued or running (tests, benchmarks)."""
        await self._idle.wait()

    # -- what the relay asks

    def capture_bytes(self, backend: Backend, ex: Exchange) -> int:
        """How much of this stream to keep for counting: 0 unless its backend may
        leave it uncounted."""
        state = self._states.get(backend.name)
        if (state is None or not ex.route.openai_generation or state.tokenizer is None
                or state.reports_usage.get(ex.route.name)):
            return 0
        return CAPTURE_BYTES

    def ended(self, ex: Exchange, backend: Backend | None, record: RequestRecord,
              scanner: StreamScanner | None) -> None:
        """A request is over and its record durable (the metering's ``after``): count a
        stream its backend did not count; learn from a chat it counted."""
        if scanner is not None and backend is not None:
            self._stream_ended(ex, backend, record, scanner)
        else:
            self._chat_counted(ex, record)

    def _stream_ended(self, ex: Exchange, backend: Backend, record: RequestRecord,
                      scanner: StreamScanner) -> None:
        """Learn whether the backend counted the stream, and count it if it did not."""
        state = self._states.get(backend.name)
        tally = scanner.tally
        if (state is None or not ex.route.openai_generation or not tally.finished
                or tally.error):
            return
        state.reports_usage[ex.route.name] = tally.exact
        frames = scanner.captured
        if record.estimated and not tally.exact and frames is not None and ex.model:
            self._start(state, ex, self._count_stream(state, ex, record, frames))

    def _chat_counted(self, ex: Exchange, record: RequestRecord) -> None:
        """On a backend whose streams come without usage, a non-streamed chat it counted
        teaches what its template adds, for a tokenizer that cannot apply it
        (llama-cpp-python)."""
        state = self._states.get(record.backend or "")
        if (state is None or record.estimated or record.stream or record.prompt_tokens <= 0
                or not (ex.route.openai_generation and ex.route.text is Text.MESSAGES)
                or not ex.model or state.tokenizer is None
                or False not in state.reports_usage.values()):
            return  # nothing to learn (checked per request: the cheap tests first)
        shape = prompt_shape(ex.body_obj)
        if shape is None or self._overheads.overhead(state.basis, ex.route.name, ex.model,
                                                     shape)[1]:
            return  # a confirmed overhead costs no more calls
        if state.tokenizer is _UNKNOWN or state.tokenizer.dialect is Dialect.LLAMA_CPP_PYTHON:
            self._start(state, ex, self._learn_template(state, ex, record))

    # -- the jobs

    def _start(self, state: _BackendState, ex: Exchange, job: Coroutine[Any, Any, None]) -> None:
        if self._nursery is None or state.jobs >= MAX_QUEUED:
            job.close()
            log.warning("%s: no room to count with %s's tokenizer (%d jobs); estimate kept",
                        ex.request_id.decode(), state.backend.name, state.jobs)
            return
        state.jobs += 1
        self.running += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        self._nursery.start_soon(self._guarded, state, ex, job)

    async def _guarded(self, state: _BackendState, ex: Exchange,
                       job: Coroutine[Any, Any, None]) -> None:
        try:
            with trio.fail_after(JOB_TIMEOUT_S):
                if not state.backend.native:
                    # the servers that need counting (llama-cpp-python) end a running
                    # stream when another request arrives: ask between requests
                    await state.backend.wait_idle()
                async with state.slots:
                    await job
        except (CountError, ProxyError, trio.TooSlowError) as err:
            self.failed += 1
            why = f"no answer within {JOB_TIMEOUT_S:g} s" if isinstance(
                err, trio.TooSlowError) else getattr(err, "message", None) or str(err)
            log.warning("%s: counting with %s's tokenizer failed, estimate kept: %s",
                        ex.request_id.decode(), state.backend.name, why)
        except Exception:  # a bug, or a backend answer nobody foresaw: never the gateway's end
            self.failed += 1
            log.exception("%s: counting with %s's tokenizer failed, estimate kept",
                          ex.request_id.decode(), state.backend.name)
        finally:
            job.close()  # cancelled before it began: no "never awaited" warning
            state.jobs -= 1
            self.running -= 1
            if not self.running:
                self._idle.set()

    async def _tokenizer(self, state: _BackendState, model: str) -> Tokenizer | None:
        """The backend's tokenizer, looked for once (one job at a time asks)."""
        async with state.discovering:
            if state.tokenizer is _UNKNOWN and trio.current_time() >= state.retry_at:
                state.retry_at = trio.current_time() + RETRY_DISCOVERY_S  # if this fails
                state.tokenizer = await self._drive(state, discover(model))
                found = state.tokenizer
                log.info("backend %s: %s", state.backend.name,
                         f"counts with the {found.dialect.value} tokenize endpoint" if found
                         else "has no tokenize endpoint; streams without usage stay estimated")
        return None if state.tokenizer is _UNKNOWN else state.tokenizer

    async def _count_stream(self, state: _BackendState, ex: Exchange, record: RequestRecord,
                            frames: list[bytes]) -> None:
        model = ex.model
        assert model is not None
        tok = await self._tokenizer(state, model)
        if tok is None:
            return
        route, body = ex.route.name, ex.body_obj
        overhead = self._overheads.overhead(state.basis, route, model, prompt_shape(body))
        counts = await self._drive(state, stream_counts(tok, model, ex.route, body, frames,
                                                        overhead))
        if counts is None:
            return
        prompt, completion = counts
        await self._amend(record, prompt, completion)
        self.amended += 1
        for hook in self._on_exact:
            hook(ex, record, prompt, completion)
        text = estimate_prompt_tokens(body)
        self._overheads.learn(TEXT, route, model, prompt_shape(body), prompt - text, text)
        log.info("%s: exact counts from %s's tokenizer: prompt %d (estimated %d), "
                 "completion %d (estimated %d)", record.request_id, state.backend.name,
                 prompt, record.prompt_tokens, completion, record.completion_tokens)

    async def _learn_template(self, state: _BackendState, ex: Exchange,
                              record: RequestRecord) -> None:
        model = ex.model
        assert model is not None
        tok = await self._tokenizer(state, model)
        if tok is None or tok.dialect is not Dialect.LLAMA_CPP_PYTHON:
            return
        learned = await self._drive(state, template_overhead(tok, model, ex.body_obj,
                                                             record.prompt_tokens))
        if learned is not None:
            added, text = learned
            self._overheads.learn(state.basis, ex.route.name, model,
                                  prompt_shape(ex.body_obj), added, text)

    async def _drive(self, state: _BackendState, job: Counting) -> Any:
        """Run a pure job, making each call it yields."""
        try:
            call = next(job)
            while True:
                call = job.send(await self._post(state.backend, call))
        except StopIteration as end:
            return end.value

    @staticmethod
    async def _post(backend: Backend, call: Call) -> Any:
        body = call.encode()
        headers = [(b"host", backend.host_header), (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if backend.api_key:
            headers.append((b"authorization", b"Bearer " + backend.api_key.encode()))
        response = await backend.pool.request("POST", backend.target(call.path), headers, body)
        try:
            raw = await response.read_all(MAX_ANSWER_BYTES)
        finally:
            await response.aclose()
        return parse_answer(response.status, raw)

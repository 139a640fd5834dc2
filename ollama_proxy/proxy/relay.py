"""One proxied request, end to end: route → policy chain → backend → relay
of the response → usage to the sink.

Streams go to the client frame by frame as they arrive, bytes unchanged (cut
only at frame ends so a broken upstream never leaves half a frame); replies
that do not stream are small JSON documents and are read whole, so their
usage can be recorded before the client gets their last byte. The usage of a
response is always handed to the sink before its final bytes are sent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Callable, Protocol, Sequence

import trio

from ..backends.registry import Backend, BackendSet
from ..errors import (
    ProxyError,
    ShuttingDown,
    Unauthorized,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
    family_of,
    render,
)
from ..api.framing import FrameKind
from ..api.headers import client_response_headers, upstream_request_headers
from ..api.models import filter_listing
from ..api.body_rules import apply_openai_rules, parse_body, wants_stream
from ..api.exchange import Exchange, PolicyStep
from ..access.identity import KeyIndex, authorize
from ..api.routes import Route, RouteKind
from ..http.messages import JSON_TYPE, Request
from ..http.responder import ClientGone, ClientStalled, Responder
from ..http.client import ResponseTooLarge, UpstreamResponse
from ..api.record import Outcome, RequestRecord
from ..api.usage import StreamScanner, UsageTally, estimate_prompt_tokens, scan_whole_body

log = logging.getLogger("ollama_proxy.relay")

# A JSON body this big, or with this many objects and arrays, is decoded in a worker
# thread: a hostile one (a megabyte of tiny objects) costs tens of milliseconds to
# seconds of CPU, which must not stall every other request; at most BIG_PARSES at once.
# Honest chats are smaller (a 100-message chat is ~25 KB with ~200 containers).
PARSE_IN_THREAD_BYTES = 64 * 1024
PARSE_IN_THREAD_CONTAINERS = 1000
BIG_PARSES = 2
# A reply cut for its size is counted by its bytes (its usage was at its end).
BYTES_PER_TOKEN = 4

# A bounded, shielded wait for the sink when the request is being cancelled.
RECORD_TIMEOUT_S = 5.0
# A client's X-Request-Id is kept when it looks like an id, else we make one.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class UsageSink(Protocol):
    """Where usage goes durably; awaited before a response's last bytes are sent."""

    async def record(self, record: RequestRecord) -> None: ...


class UsageObserver(Protocol):
    """Told of each usage record after its response ended (off the latency path)."""

    def observe(self, record: RequestRecord) -> None: ...


class StreamCounter(Protocol):
    """Counts streams their backend did not count, after they ended (``recount``)."""

    def capture_bytes(self, backend: Backend, ex: Exchange) -> int:
        """How many bytes of this stream to keep for that (0: none)."""
        ...

    def stream_ended(self, ex: Exchange, backend: Backend, record: RequestRecord,
                     scanner: StreamScanner) -> None:
        """The stream is over, its record committed; must not block."""
        ...


# Told of each usage record the moment it is built, before the sink and before the
# response's last bytes (the limits settle their reservation here). Must not block.
UsageHook = Callable[[Exchange, RequestRecord], None]


class UsageLog:
    """Usage as one JSON log line per request: the access log.

    A line costs tens of microseconds (JSON, logging, a write), so lines are
    kept and written by ``flush`` while the gateway waits for a backend (the
    relay's ``while_waiting``), and at least every ``FLUSH_EVERY_S`` (the
    gateway's timer): never on a response's latency path.
    """

    FLUSH_EVERY_S = 1.0
    MAX_PENDING = 1000  # past this, observe writes at once (memory stays bounded)

    def __init__(self) -> None:
        self._log = logging.getLogger("ollama_proxy.usage")
        self._pending: list[RequestRecord] = []

    def observe(self, record: RequestRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and self._log.isEnabledFor(logging.INFO):
            for record in pending:
                self._log.info("%s", record.to_json())

    async def run(self) -> None:
        """Flush on a timer, so lines appear when no request comes to carry them out."""
        try:
            while True:
                await trio.sleep(self.FLUSH_EVERY_S)
                self.flush()
        finally:
            self.flush()


def _outcome_of_error(err: ProxyError) -> Outcome:
    if isinstance(err, ShuttingDown):
        return Outcome.CANCELLED
    if isinstance(err, UpstreamUnreachable):
        return Outcome.UNREACHABLE
    if isinstance(err, UpstreamTimeout):
        return Outcome.TIMEOUT
    if isinstance(err, UpstreamProtocolError):
        return Outcome.UPSTREAM_ERROR
    return Outcome.REFUSED


class _Meter:
    """Collects what one exchange used and hands it to the sink exactly once."""

    __slots__ = ("exchange", "backend", "status", "tally", "ttfb_s", "recorded", "record",
                 "started")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.backend: Backend | None = None
        self.status = 0
        self.tally = UsageTally(exact=True)  # nothing used until a backend is asked
        self.ttfb_s: float | None = None
        self.recorded = False
        self.record: RequestRecord | None = None
        self.started = time.perf_counter()

    def build(self, outcome: Outcome, estimate_prompt: Callable[[Exchange], int]) -> RequestRecord:
        ex = self.exchange
        tally = self.tally
        if not tally.exact:  # walking the request body only when it is needed
            tally.estimate(estimate_prompt(ex))
        return RequestRecord(
            request_id=ex.request_id.decode(),
            time=ex.started_at,
            endpoint=ex.request.path,
            model=ex.model,
            backend=self.backend.name if self.backend else None,
            status=self.status,
            outcome=outcome,
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            estimated=not tally.exact or tally.clamped,
            stream=ex.stream,
            duration_s=round(time.perf_counter() - self.started, 6),
            ttfb_s=self.ttfb_s,
            client=ex.request.client,
            user=ex.principal.user if ex.principal else None,
            key_prefix=ex.principal.prefix if ex.principal else None,
            metered=ex.route.metered,
        )


def error_frame(kind: FrameKind, message: str) -> bytes:
    """A well-formed in-band error to end a stream that broke after its 200."""
    if kind is FrameKind.NDJSON:
        return json.dumps({"error": message}).encode() + b"\n"
    payload = {"error": {"message": message, "type": "api_error", "param": None,
                         "code": "upstream_error"}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _frame_kind(content_type: bytes | None) -> FrameKind | None:
    ctype = (content_type or b"").lower()
    if b"ndjson" in ctype:
        return FrameKind.NDJSON
    if b"text/event-stream" in ctype:
        return FrameKind.SSE
    return None


class Relay:
    """The request handler for every proxied path."""

    def __init__(
        self,
        router: BackendSet,
        sink: UsageSink,
        *,
        observers: Sequence[UsageObserver] = (),
        index: KeyIndex | None = None,
        steps: Sequence[PolicyStep] = (),
        on_usage: Sequence[UsageHook] = (),
        while_waiting: Sequence[Callable[[], None]] = (),
        max_response_bytes: int = 256 * 1024 * 1024,
        max_frame_bytes: int = 1 << 20,
        estimate_prompt: Callable[[Exchange], int] = lambda ex: estimate_prompt_tokens(
            ex.body_obj),
        counter: StreamCounter | None = None,
    ) -> None:
        self._router = router
        self._sink = sink
        self._observers = tuple(observers)
        self._index = index  # None: no keys needed (tests of the bare relay)
        self._steps = tuple(steps)
        self._on_usage = tuple(on_usage)
        # Deferred work (the usage log) done once a request is sent to a backend:
        # time the gateway would otherwise spend waiting.
        self._while_waiting = tuple(while_waiting)
        self._max_response_bytes = max_response_bytes
        self._max_frame_bytes = max_frame_bytes
        # The prompt count of a row the backend did not count (text + learned overhead).
        self._estimate_prompt = estimate_prompt
        self._counter = counter
        self._big_parses = trio.CapacityLimiter(BIG_PARSES)

    async def handle(self, request: Request, responder: Responder, route: Route) -> None:
        """Relay ``request``, whose path and method the dispatch table matched to ``route``."""
        await self._proxy(Exchange(request, route, self._request_id(request)), responder)

    @staticmethod
    def _request_id(request: Request) -> bytes:
        given = request.header(b"x-request-id")
        if given is not None and _REQUEST_ID.fullmatch(given):
            return given
        return os.urandom(16).hex().encode()  # a uuid4's randomness, without the object

    async def _proxy(self, ex: Exchange, responder: Responder) -> None:
        meter = _Meter(ex)
        upstream: UpstreamResponse | None = None
        try:
            try:
                if self._index is not None:
                    ex.principal = self._index.identify(ex.request)
                    authorize(ex.principal, admin=ex.route.admin_only)
                # Only now: a stranger's body is never read (its connection closes).
                await ex.request.read_body()
                ex.body_obj = await self._parse(ex)
                ex.stream = wants_stream(ex.route, ex.body_obj)
                if ex.body_obj is not None:  # first: the steps see max_tokens, never its alias
                    ex.body_dirty, ex.usage_injected = apply_openai_rules(
                        ex.route, ex.body_obj, ex.stream)
                for step in self._steps:
                    await step(ex)
                with responder.stop_scope():  # a drain's grace ends the wait here
                    upstream = await self._open_upstream(ex, meter)
                if upstream is None:
                    raise ShuttingDown("the gateway is shutting down; retry", retry_after_s=1)
            except ProxyError as err:
                meter.status = err.status
                if isinstance(err, Unauthorized):  # no ledger rows for strangers
                    meter.recorded = True
                else:
                    await self._record(meter, _outcome_of_error(err))
                await self._send_error(responder, ex, err)
                return
            meter.ttfb_s = round(time.perf_counter() - meter.started, 6)
            meter.status = upstream.status
            kind = _frame_kind(upstream.header(b"content-type"))
            if kind is None:
                await self._relay_whole(ex, upstream, responder, meter)
            else:
                await self._relay_stream(ex, upstream, responder, meter, kind)
        except ClientGone as gone:
            await self._record(meter, Outcome.CLIENT_STALLED if isinstance(gone, ClientStalled)
                               else Outcome.CLIENT_CLOSED)
        except Exception:  # a bug: the server logs it once and answers 500
            meter.status = 500
            await self._record(meter, Outcome.ERROR)
            raise
        finally:
            if not meter.recorded:  # cancelled: the client left, or shutdown
                await self._record(meter, Outcome.CLIENT_CLOSED if responder.client_gone
                                   else Outcome.CANCELLED)
            if upstream is not None:
                await upstream.aclose()
            if meter.record is not None:
                for observer in self._observers:
                    observer.observe(meter.record)

    async def _parse(self, ex: Exchange) -> dict[str, Any] | None:
        body = ex.request.body
        if len(body) < PARSE_IN_THREAD_BYTES and (
                body.count(b"{") + body.count(b"[") < PARSE_IN_THREAD_CONTAINERS):
            return parse_body(ex.route, body)  # a few microseconds: not worth a thread
        return await trio.to_thread.run_sync(parse_body, ex.route, body,
                                             limiter=self._big_parses)

    async def _open_upstream(self, ex: Exchange, meter: _Meter) -> UpstreamResponse:
        """Send to the first backend that takes the connection."""
        request = ex.request
        body = ex.body()
        failure: ProxyError | None = None
        for backend in self._router.candidates(ex):
            headers = upstream_request_headers(
                request.headers, host=backend.host_header, body_length=len(body),
                api_key=backend.api_key, request_id=ex.request_id,
            )
            meter.backend = backend
            if ex.route.metered:
                meter.tally = UsageTally()  # sent: from here on, usage is unknown until counted
            try:
                response = await backend.pool.request(
                    ex.upstream_method, backend.target(request.target), headers, body,
                    on_sent=self._waiting if self._while_waiting else None)
            except UpstreamUnreachable as err:
                meter.tally = UsageTally(exact=True)  # never reached a backend: nothing used
                backend.mark(False, err.message)
                failure = err
                continue
            backend.mark(True)
            return response
        assert failure is not None
        raise failure

    def _waiting(self) -> None:
        for work in self._while_waiting:
            try:
                work()
            except Exception:  # deferred work never fails the request it rides on
                log.exception("deferred work failed")

    def _response_headers(self, ex: Exchange, upstream: UpstreamResponse,
                          streaming: bool) -> list[tuple[bytes, bytes]]:
        headers = client_response_headers(upstream.headers, streaming=streaming,
                                          request_id=ex.request_id)
        if ex.extra_headers:  # ours tell this user's limits: a backend's own would contradict them
            headers = [h for h in headers if not h[0].startswith(b"x-ratelimit-")]
            headers += ex.extra_headers
        return headers

    async def _relay_whole(self, ex: Exchange, upstream: UpstreamResponse,
                           responder: Responder, meter: _Meter) -> None:
        """A reply that does not stream: read whole (to read its usage), recorded, sent."""
        metered = ex.route.metered
        body: bytes | None = None
        try:
            with responder.stop_scope():  # a drain's grace ends the read here
                body = await upstream.read_all(self._max_response_bytes)
            if body is None:
                raise ShuttingDown("the gateway is shutting down; retry", retry_after_s=1)
        except ProxyError as err:
            meter.status = err.status
            if isinstance(err, ResponseTooLarge) and ex.route.kind is RouteKind.GENERATION:
                meter.tally.frames = err.received // BYTES_PER_TOKEN  # what the reply held, roughly
            await self._record(meter, _outcome_of_error(err))
            await self._send_error(responder, ex, err)
            return
        headers = self._response_headers(ex, upstream, streaming=False)
        if metered and upstream.status < 400:
            meter.tally = scan_whole_body(body)
        elif metered and upstream.status < 500:  # refused by the backend: nothing used
            meter.tally = UsageTally(exact=True)
        if ex.visible_models is not None and 200 <= upstream.status < 300 and body:
            body = filter_listing(ex.visible_models, body)
        await self._record(meter, Outcome.OK if upstream.status < 500 else Outcome.UPSTREAM_ERROR)
        if ex.upstream_method == "HEAD":  # no body came: the length the backend announced
            length = upstream.header(b"content-length")
            await responder.start(upstream.status, headers,
                                  length=int(length) if length and length.isdigit() else 0)
            await responder.end()
        else:  # a HEAD fetched with GET gets the length of what a GET gets, no body
            await responder.respond(upstream.status, headers, body)

    async def _relay_stream(self, ex: Exchange, upstream: UpstreamResponse,
                            responder: Responder, meter: _Meter, kind: FrameKind) -> None:
        """A stream: frames go out as they come; a broken or cut stream ends with an
        error frame, so the client always sees a well-formed end."""
        assert meter.backend is not None
        capture = self._counter.capture_bytes(meter.backend, ex) if self._counter else 0
        scanner = StreamScanner(kind, drop_usage_chunk=ex.usage_injected,
                                max_frame_bytes=self._max_frame_bytes, capture_bytes=capture)
        tally = meter.tally = scanner.tally
        await responder.start(upstream.status, self._response_headers(ex, upstream, True))
        failure: str | None = None
        cut = False  # by a drain

        def outcome() -> Outcome:
            if cut:
                return Outcome.CANCELLED
            bad = failure is not None or tally.error is not None or upstream.status >= 500
            return Outcome.UPSTREAM_ERROR if bad else Outcome.OK

        # A drain's grace ends the stream by closing its backend connection: a write to a
        # slow client is never cut in the middle.
        responder.on_stop(upstream.stop)
        try:
            while True:
                data = await upstream.receive()
                if not data:
                    break
                out = scanner.feed(data)
                if out:
                    if tally.finished or tally.error is not None:
                        # the backend's end marker (or its error, which ends a stream) is
                        # in this piece: commit the usage first, so a client that stops
                        # reading there (the ollama client raises on the error line) is
                        # counted as is
                        await self._record(meter, outcome())
                    await responder.write(out)
            out = scanner.finish()
            if out:
                await responder.write(out)
        except (UpstreamTimeout, UpstreamProtocolError) as err:
            if upstream.stopped:  # by the drain, not the backend
                failure, cut = "the gateway is shutting down", True
            else:
                failure = err.message
                log.warning("%s: backend broke mid-stream: %s", ex.request_id.decode(),
                            err.message)
        if failure is None and ex.route.metered and upstream.status < 400 \
                and not tally.finished and tally.error is None:
            failure = "the backend ended the stream before it was complete"
        if failure is not None:
            await responder.write(error_frame(kind, failure))
        await self._record(meter, outcome())
        await responder.end()
        if self._counter is not None and meter.record is not None:
            self._counter.stream_ended(ex, meter.backend, meter.record, scanner)

    async def _record(self, meter: _Meter, outcome: Outcome) -> None:
        """Hand the usage to the sink once; a client leaving meanwhile cannot stop it."""
        if meter.recorded:
            return
        meter.recorded = True
        record = meter.record = meter.build(outcome, self._estimate_prompt)
        for hook in self._on_usage:
            hook(meter.exchange, record)
        # A bare scope: move_on_after's generator costs more, once per request.
        with trio.CancelScope(deadline=trio.current_time() + RECORD_TIMEOUT_S,
                              shield=True) as scope:
            await self._sink.record(record)
        if scope.cancelled_caught:
            log.error("%s: usage sink did not take the record within %g s",
                      meter.exchange.request_id.decode(), RECORD_TIMEOUT_S)

    async def _send_error(self, responder: Responder, ex: Exchange, err: ProxyError) -> None:
        body = render(family_of(ex.request.path), err)
        headers = [(b"content-type", JSON_TYPE), (b"x-request-id", ex.request_id), *err.headers(),
                   *(ex.extra_headers or ())]
        await responder.respond(err.status, headers, body)

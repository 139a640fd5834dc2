"""One proxied request, end to end: identify the caller → read and check the body →
policy steps (limits) → a backend → forward its response → meter it.

Streams go to the client frame by frame as they arrive, bytes unchanged (cut
only at frame ends so a broken upstream never leaves half a frame); replies
that do not stream are small JSON documents and are read whole, so their
usage can be recorded before the client gets their last byte. A response's
record is always durable (``Metering.durable``) before its final bytes are sent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Callable, Sequence

import trio

from ..access.identity import KeyIndex, authorize
from ..api.body_rules import apply_openai_rules, parse_body, wants_stream
from ..api.exchange import Exchange, PolicyStep
from ..api.framing import FrameKind
from ..api.headers import client_response_headers, upstream_request_headers
from ..api.models import NO_ALIASES, Aliases
from ..api.record import Outcome
from ..api.routes import Route, RouteKind
from ..api.usage import StreamScanner, UsageTally, scan_whole_body
from ..backends.registry import Backend
from ..backends.router import Lease, Router
from ..errors import (
    ApiFamily,
    BadRequest,
    NotFound,
    ProxyError,
    ShuttingDown,
    Unauthorized,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
    openai_error,
    render,
)
from ..http.client import ResponseTooLarge, UpstreamResponse
from ..http.messages import JSON_TYPE, Request
from ..http.responder import ClientGone, ClientStalled, Responder
from .fanout import Answer, ask_all, backend_param, management_answer, merged_listing, no_backend
from .metering import Metering, RecordDraft

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
# A request that could not be served goes to the next eligible backend at most this often,
# and never once its first byte went to the client.
MAX_RETRIES = 2
# A backend's answers that say it cannot serve now, not that the request is bad: marked,
# and the request goes on to the next eligible backend.
UNAVAILABLE = frozenset({502, 503, 504})
# Sent to every ollama backend unless ?backend=NAME picks one (the rest need one named).
FAN_OUT_MANAGEMENT = frozenset({"pull", "delete"})
NDJSON_TYPE = b"application/x-ndjson"
# A client's X-Request-Id is kept when it looks like an id, else we make one.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


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


def _native(ex: Exchange) -> bool:
    return ex.route.family is ApiFamily.NATIVE


def _restricted(backend: Backend) -> bool:
    """Its ``models`` globs or ``max_model_gb`` hide some of what it lists."""
    return backend.spec.globs is not None or backend.spec.max_model_bytes is not None


def _free_slot(draft: RecordDraft) -> None:
    """Give the request's slot back (once) as soon as its backend is done, charging the
    output it got: before the ledger's commit and the client's last bytes."""
    if draft.lease is not None:
        tally = draft.tally
        draft.lease.free_slot(tally.completion_tokens if tally.exact else tally.frames)


def _routing_model(ex: Exchange) -> str | None:
    """The model that picks the backend (None: any backend of the API's kind)."""
    return ex.model if ex.route.routes_by_model else None


def _shutting_down() -> ShuttingDown:
    """A drain's grace ran out before the backend answered: the client may retry."""
    return ShuttingDown("the gateway is shutting down; retry", retry_after_s=1)


class ProxyHandler:
    """The request handler for every proxied path."""

    def __init__(
        self,
        router: Router,
        index: KeyIndex,
        metering: Metering,
        *,
        steps: Sequence[PolicyStep] = (),
        aliases: Aliases = NO_ALIASES,
        max_response_bytes: int = 256 * 1024 * 1024,
        max_frame_bytes: int = 1 << 20,
    ) -> None:
        self._router = router
        self._index = index
        self._metering = metering
        self._steps = tuple(steps)
        # Replaced whole by a config reload; a request reads it once, so one in flight
        # keeps the target it was sent to.
        self.aliases = aliases
        self._max_response_bytes = max_response_bytes
        self._max_frame_bytes = max_frame_bytes
        self._big_parses = trio.CapacityLimiter(BIG_PARSES)

    async def handle(self, request: Request, responder: Responder, route: Route) -> None:
        """Relay ``request``, whose path and method the dispatch table matched to ``route``."""
        await self._serve(Exchange(request, route, self._request_id(request)), responder)

    @staticmethod
    def _request_id(request: Request) -> bytes:
        given = request.header(b"x-request-id")
        if given is not None and _REQUEST_ID.fullmatch(given):
            return given
        return os.urandom(16).hex().encode()  # a uuid4's randomness, without the object

    async def _serve(self, ex: Exchange, responder: Responder) -> None:
        """Identify, check, limit, send upstream, forward the response; metered
        whatever happens (a refusal, a client leaving, a bug)."""
        draft = RecordDraft(ex)
        upstream: UpstreamResponse | None = None
        try:
            try:
                ex.principal = self._index.identify(ex.request)
                authorize(ex.principal, admin=ex.route.admin_only)
                # Only now: a stranger's body is never read (its connection closes).
                await ex.request.read_body()
                ex.body_obj = await self._parse(ex)
                ex.stream = wants_stream(ex.route, ex.body_obj)
                if ex.body_obj is not None:  # first: the steps see max_tokens, never its alias
                    ex.body_dirty, ex.usage_injected = apply_openai_rules(
                        ex.route, ex.body_obj, ex.stream)
                ex.resolve_alias(self.aliases)  # before the steps: limits judge the target
                for step in self._steps:
                    await step(ex)
                if await self._serve_several(ex, responder, draft):
                    return
                with responder.stop_scope():  # a drain's grace ends the wait here
                    upstream = await self._send_upstream(ex, draft)
                if upstream is None:
                    raise _shutting_down()
            except ProxyError as err:
                await self._fail(responder, draft, err)
                return
            draft.ttfb_s = round(time.perf_counter() - draft.started, 6)
            draft.status = upstream.status
            kind = _frame_kind(upstream.header(b"content-type"))
            if kind is None:
                await self._forward_whole(ex, upstream, responder, draft)
            else:
                await self._forward_stream(ex, upstream, responder, draft, kind)
        except ClientGone as gone:
            await self._record(draft, Outcome.CLIENT_STALLED if isinstance(gone, ClientStalled)
                               else Outcome.CLIENT_CLOSED)
        except Exception:  # a bug: the server logs it once and answers 500
            draft.status = 500
            await self._record(draft, Outcome.ERROR)
            raise
        finally:
            _free_slot(draft)  # (if not yet) first: synchronous, it cannot be cancelled
            try:
                if not draft.recorded:  # cancelled: the client left, or shutdown
                    await self._record(draft, Outcome.CLIENT_CLOSED if responder.client_gone
                                       else Outcome.CANCELLED)
                if upstream is not None:
                    await upstream.aclose()
            finally:  # its connection is back (or closed): the backend is done with it
                if draft.lease is not None:
                    draft.lease.release()
            self._metering.after(draft)

    async def _parse(self, ex: Exchange) -> dict[str, Any] | None:
        body = ex.request.body
        if len(body) < PARSE_IN_THREAD_BYTES and (
                body.count(b"{") + body.count(b"[") < PARSE_IN_THREAD_CONTAINERS):
            return parse_body(ex.route, body)  # a few microseconds: not worth a thread
        return await trio.to_thread.run_sync(parse_body, ex.route, body,
                                             limiter=self._big_parses)

    async def _send_upstream(self, ex: Exchange, draft: RecordDraft) -> UpstreamResponse:
        """Send to a backend the router picks; one that refuses, breaks before its
        answer or answers 502, 503 or 504 is marked, and the next one is tried
        (``MAX_RETRIES``; never for model management or a named backend): nothing has
        reached the client yet."""
        body = ex.body()
        tried: set[Backend] = set()
        failure: ProxyError | None = None

        def waited(seconds: float) -> None:  # for a slot, whether it got one or not
            draft.queued_s += seconds

        for attempt in range(MAX_RETRIES + 1):
            try:
                lease = await self._lease(ex, frozenset(tried), waited)
            except ProxyError:
                if failure is None:
                    raise
                raise failure from None  # no other backend to try: the failure stands
            backend = lease.backend
            draft.lease, draft.backend = lease, backend
            headers = upstream_request_headers(
                ex.request.headers, host=backend.host_header, body_length=len(body),
                api_key=backend.api_key, request_id=ex.request_id,
            )
            if ex.route.metered:
                draft.tally = UsageTally()  # sent: from here on, usage is unknown until counted
            try:
                response = await backend.pool.request(
                    ex.upstream_method, backend.target(ex.upstream_target), headers, body,
                    on_sent=self._metering.while_waiting)
            except (UpstreamUnreachable, UpstreamTimeout, UpstreamProtocolError) as err:
                if isinstance(err, UpstreamUnreachable):  # never reached it: nothing used
                    draft.tally = UsageTally(exact=True)
                    backend.unreachable(err.message)
                else:
                    log.warning("%s: backend %s failed before answering: %s",
                                ex.request_id.decode(), backend.name, err.message)
                    backend.failed(err.message)
                lease.release()
                tried.add(backend)
                failure = err
                continue
            if response.status not in UNAVAILABLE or ex.pinned is not None \
                    or ex.route.kind is RouteKind.MANAGEMENT:
                if response.status < 500:
                    backend.succeeded()
                return response  # a 500 is about this request (a model error): forwarded
            # unavailable (an overloaded Ollama answers 503 at once): it must not look fast
            backend.failed(f"answered {response.status}")
            tried.add(backend)
            if attempt == MAX_RETRIES or not self._router.eligible(
                    _routing_model(ex), _native(ex), frozenset(tried)):
                return response
            await response.aclose()
            lease.release()
            draft.tally = UsageTally(exact=True)
            failure = None
        assert failure is not None
        raise failure

    async def _serve_several(self, ex: Exchange, responder: Responder, draft: RecordDraft
                             ) -> bool:
        """A model list or a management request for several backends: sent to each,
        answered once (True). False: it goes to one backend (``ex.pinned`` set when
        ``?backend=NAME`` names it)."""
        route = ex.route
        if not route.lists_models and route.kind is not RouteKind.MANAGEMENT:
            return False  # most requests: one backend
        native = _native(ex)
        kinds = self._router.backends.of_kind(native)
        if route.kind is RouteKind.MANAGEMENT:
            name, ex.target_override = backend_param(ex.request.target)
            if name is not None:
                ex.pinned = self._router.backends.by_name(name)
                if ex.pinned is None or not ex.pinned.native:
                    raise BadRequest(f"?backend={name}: no ollama backend has that name; "
                                     f"they are: {', '.join(b.name for b in kinds)}")
                return False
            if len(kinds) <= 1:
                return False
            if route.name not in FAN_OUT_MANAGEMENT:
                raise BadRequest(f"{ex.request.path} with several ollama backends: name one with "
                                 f"?backend=NAME ({', '.join(b.name for b in kinds)})")
        elif not route.lists_models or (len(kinds) == 1 and not _restricted(kinds[0])):
            return False  # one backend that serves all it lists: its own answer
        if not kinds:  # no ollama backend at all: nothing to list natively
            raise NotFound(f"{ex.request.path}: no ollama backend is configured; the models "
                           "are listed at /v1/models")
        backends = self._router.eligible(None, native, frozenset())
        if not backends:
            raise no_backend(native)
        if route.lists_models:
            answers = await ask_all(backends, "GET", ex.request.target, ex.request.headers, b"",
                                    ex.request_id)
            status, body, ctype = 200, merged_listing(route, answers), JSON_TYPE
            if ex.rewrites_reply:
                body = ex.reply(body)
        else:
            obj = dict(ex.body_obj or {}, stream=False)  # one answer per backend, not progress
            answers = await ask_all(backends, ex.request.method, ex.request.target,
                                    ex.request.headers, json.dumps(obj).encode(), ex.request_id,
                                    timeout_s=None, max_bytes=self._max_response_bytes)
            # one down or ejected was not asked: the answer says so (a pull it missed)
            answers += [Answer(b, error=b.health.last_error or "down or ejected: not asked")
                        for b in kinds if b not in backends]
            status, payload = management_answer(answers, route.name)
            body = json.dumps(payload).encode()
            ctype = JSON_TYPE
            if ex.stream:  # the client reads progress lines: the one line says it all
                body, ctype = body + b"\n", NDJSON_TYPE
        draft.status = status
        await self._record(draft, Outcome.OK if status < 500 else Outcome.UPSTREAM_ERROR)
        headers = [(b"content-type", ctype), (b"x-request-id", ex.request_id),
                   *(ex.extra_headers or ())]
        if ex.request.method == "HEAD":
            await responder.start(status, headers, length=len(body))
            await responder.end()
        else:
            await responder.respond(status, headers, body)
        return True

    async def _lease(self, ex: Exchange, exclude: frozenset[Backend],
                     on_waited: Callable[[float], None]) -> Lease:
        if ex.pinned is not None:
            if ex.pinned in exclude:  # the one named failed: no other may stand in
                raise no_backend(True)
            return self._router.pinned(ex.pinned)
        principal = ex.principal
        metered = ex.route.metered
        return await self._router.lease(
            model=_routing_model(ex), native=_native(ex),
            slotted=metered, user=principal.user if principal else "",
            weight=ex.weight, exclude=exclude, on_waited=on_waited,
            prompt_tokens=len(ex.request.body) // BYTES_PER_TOKEN if metered else 0)

    def _response_headers(self, ex: Exchange, upstream: UpstreamResponse,
                          streaming: bool) -> list[tuple[bytes, bytes]]:
        headers = client_response_headers(upstream.headers, streaming=streaming,
                                          request_id=ex.request_id)
        if ex.extra_headers:  # ours tell this user's limits: a backend's own would contradict them
            headers = [h for h in headers if not h[0].startswith(b"x-ratelimit-")]
            headers += ex.extra_headers
        return headers

    async def _forward_whole(self, ex: Exchange, upstream: UpstreamResponse,
                             responder: Responder, draft: RecordDraft) -> None:
        """A reply that does not stream: read whole (to read its usage), recorded, sent."""
        metered = ex.route.metered
        try:
            with responder.stop_scope():  # a drain's grace ends the read here
                body = await upstream.read_all(self._max_response_bytes)
            if body is None:
                raise _shutting_down()
        except ProxyError as err:
            if isinstance(err, ResponseTooLarge) and ex.route.kind is RouteKind.GENERATION:
                draft.tally.frames = err.received // BYTES_PER_TOKEN  # what the reply held, roughly
            await self._fail(responder, draft, err)
            return
        headers = self._response_headers(ex, upstream, streaming=False)
        if metered and upstream.status < 400:
            draft.tally = scan_whole_body(body)
        elif metered and upstream.status < 500:  # refused by the backend: nothing used
            draft.tally = UsageTally(exact=True)
        _free_slot(draft)  # the backend is done: its slot goes on before the ledger's commit
        if ex.rewrites_reply and 200 <= upstream.status < 300 and body:
            body = ex.reply(body)
        if upstream.status >= 400 and ex.route.family is ApiFamily.OPENAI and \
                (reshaped := openai_error(upstream.status, body)) is not None:
            body = reshaped  # an openai client reads error.message: not every backend says it so
            headers = [h for h in headers if h[0] != b"content-type"] + [(b"content-type", JSON_TYPE)]
        await self._record(draft, Outcome.OK if upstream.status < 500 else Outcome.UPSTREAM_ERROR)
        if ex.upstream_method == "HEAD":  # no body came: the length the backend announced
            length = upstream.header(b"content-length")
            await responder.start(upstream.status, headers,
                                  length=int(length) if length and length.isdigit() else 0)
            await responder.end()
        else:  # a HEAD fetched with GET gets the length of what a GET gets, no body
            await responder.respond(upstream.status, headers, body)

    async def _forward_stream(self, ex: Exchange, upstream: UpstreamResponse,
                              responder: Responder, draft: RecordDraft, kind: FrameKind) -> None:
        """A stream: frames go out as they come; a broken or cut stream ends with an
        error frame, so the client always sees a well-formed end."""
        assert draft.backend is not None
        scanner = draft.scanner = StreamScanner(
            kind, drop_usage_chunk=ex.usage_injected, max_frame_bytes=self._max_frame_bytes,
            capture_bytes=self._metering.capture_bytes(draft.backend, ex))
        tally = draft.tally = scanner.tally
        if draft.lease is not None:
            draft.lease.stream_progress(lambda: tally.frames)
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
        first: float | None = None  # the first content frame's time (a local: cheap per chunk)
        try:
            while True:
                data = await upstream.receive()
                if not data:
                    break
                out = scanner.feed(data)
                if out:
                    if first is None and tally.frames:
                        first = draft.first_token_s = round(time.perf_counter() - draft.started, 6)
                    if tally.finished or tally.error is not None:
                        # the backend's end marker (or its error, which ends a stream) is
                        # in this piece: make the record durable first, so a client that
                        # stops reading there (the ollama client raises on the error line)
                        # is counted as is; the slot goes on first
                        _free_slot(draft)
                        await self._record(draft, outcome())
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
        _free_slot(draft)
        if failure is not None:
            await responder.write(error_frame(kind, failure))
        await self._record(draft, outcome())
        await responder.end()

    async def _record(self, draft: RecordDraft, outcome: Outcome) -> None:
        """The record built, then durable: once per request."""
        if not draft.recorded:
            await self._metering.durable(self._metering.built(draft, outcome))

    async def _fail(self, responder: Responder, draft: RecordDraft, err: ProxyError) -> None:
        """Answer ``err``, recorded first (a stranger only in the access log)."""
        draft.status = err.status
        draft.reason = err.reason
        if isinstance(err, Unauthorized):
            self._metering.stranger(draft)
        else:
            await self._record(draft, _outcome_of_error(err))
        await self._send_error(responder, draft.exchange, err)

    async def _send_error(self, responder: Responder, ex: Exchange, err: ProxyError) -> None:
        body = render(ex.route.family, err)
        headers = [(b"content-type", JSON_TYPE), (b"x-request-id", ex.request_id), *err.headers(),
                   *(ex.extra_headers or ())]
        await responder.respond(err.status, headers, body)

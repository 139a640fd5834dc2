"""The HTTP/1.1 server: one h11 connection per socket, keep-alive and
pipelining, request limits with clean errors, client-gone detection, and a
graceful drain. What to do with a request is injected as a ``Handler``.

The request loop reads the client socket itself. A handler still running
after ``WATCH_AFTER_S`` gets a watcher that peeks at the socket: EOF there
means the client left, and the handler's cancel scope is cancelled at once, so
a proxied upstream request dies with it (even while nothing is being written).

Strangers pay nothing: a request's body is read only when its handler asks
(``Request.read_body``), after it checked the key; a refused request's
connection closes without its body being read. Every resource a client can hold
is bounded: connections (in all and per address; at the cap the longest-idle
connection makes room), the time to send a head and a body, the time a client
may go without reading its response.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Awaitable, Callable

import h11
import trio

from . import sockio
from .clientip import AddressPolicy
from .connections import ConnectionTable
from ..errors import (
    ApiFamily,
    BadRequest,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    error_body,
    family_of,
    render,
)

log = logging.getLogger("ollama_proxy.server")

# Large reads keep per-request work low; h11 buffers what it is not asked for yet.
RECEIVE_SIZE = 64 * 1024
# A handler still running this long gets a watcher for its client leaving; most
# small requests are over sooner and cost the watcher nothing.
WATCH_AFTER_S = 0.05
# Bounded time for a polite close (shielded), so a stuck peer cannot hold us.
CLOSE_TIMEOUT_S = 2.0
# After a drain's grace, interrupted handlers get this long to end their responses
# well (an error line, the ledger row) before they are cancelled outright.
FINISH_S = 2.0
# Closing a socket with unread bytes resets it, which can destroy the answer we just
# sent (a 401 to a client still uploading): half-close, then discard what arrives for
# at most this long and this much, so a refused client reads its answer.
LINGER_S = 1.0
LINGER_BYTES = 1024 * 1024
# The start of a request head kept to tell its path (and so its error dialect) when
# the head turns out malformed: h11 consumes the bytes it rejects.
HEAD_PEEK_BYTES = 512


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Limits of the HTTP server (``[server]`` section, in bytes and seconds)."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    body_timeout_s: float = 60.0
    send_timeout_s: float = 60.0
    max_connections: int = 1024
    max_connections_per_ip: int = 256
    addresses: AddressPolicy = AddressPolicy()


@dataclass(slots=True)
class Request:
    """A request whose head arrived; its body is read by ``read_body``."""

    method: str
    target: str
    path: str
    query: str
    headers: list[tuple[bytes, bytes]]  # names lower-cased by h11
    body: bytes | bytearray  # b"" until read_body
    client: str  # the client's address (behind a trusted proxy: from X-Forwarded-For)
    _unread: Callable[[], Awaitable[bytearray]] | None = field(default=None, repr=False)

    def header(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read_body(self) -> bytes | bytearray:
        """The whole body, read from the client on the first call: 413 past
        ``max_body_bytes``, 408 past ``body_timeout_s`` (or a silent gap of
        ``header_timeout_s``). Call it only once the caller is known to be
        allowed: a body never read costs nothing."""
        reader = self._unread
        if reader is not None:
            self._unread = None
            self.body = await reader()
        return self.body


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


class ClientStalled(ClientGone):
    """The client accepted no byte of its response for ``send_timeout_s``: the
    connection is cut as if it had left."""


_date_second = -1
_date_value = b""


def http_date() -> bytes:
    """The ``Date`` header value, rebuilt at most once a second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = formatdate(now, usegmt=True).encode()
    return _date_value


class Delivery:
    """A whole response, rendered, that another thread may send first.

    The ledger writer sends it right after committing the response's usage, so
    the client has it a hand-over back to the event loop sooner. Whoever
    ``take``s it sends it; the other thread sends once, without blocking, and
    ``Responder.deliver`` sends whatever is left.
    """

    __slots__ = ("sock", "data", "sent", "failed", "done", "_token")

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self.sock = sock
        self.data = data
        self.sent = 0
        self.failed = False
        self.done = False  # the other thread's send is over
        self._token = [True]

    def take(self) -> bool:
        """True for the one caller that may send (``list.pop`` is atomic)."""
        try:
            self._token.pop()
        except IndexError:
            return False
        return True

    def from_thread(self) -> None:
        """In another thread: one non-blocking send, if nobody took it yet."""
        if not self.take():
            return
        try:
            self.sent = self.sock.send(self.data)
        except BlockingIOError:
            pass
        except OSError:
            self.failed = True
        finally:
            self.done = True


class Responder:
    """Sends one response on its connection; the handler's only way to write."""

    __slots__ = ("_conn", "_head_only", "_chunked", "started", "ended", "client_gone", "status",
                 "_stops")

    def __init__(self, conn: _Connection, method: str) -> None:
        self._conn = conn
        self._head_only = method == "HEAD"
        self._chunked = False  # we frame the chunks ourselves (the hot path), h11 the rest
        self.started = False
        self.ended = False
        self.client_gone = False
        self.status = 0
        self._stops: list[Callable[[], None]] = []

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called when a drain's grace runs out (at once if it has): it
        should make the handler's work end (e.g. close its backend connection), and the
        handler then has ``FINISH_S`` to end its response well."""
        self._stops.append(callback)
        self._conn.server.on_stop(callback)

    def stop_scope(self) -> trio.CancelScope:
        """A cancel scope that a drain's grace running out cancels (enter it once).
        Never write to the client inside it: a cancelled write spoils the response;
        waiting for a backend is what it is for."""
        scope = trio.CancelScope()
        self.on_stop(scope.cancel)
        return scope

    def _closing_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self._conn.closes_after_response():
            headers.append((b"connection", b"close"))

    async def start(
        self, status: int, headers: list[tuple[bytes, bytes]], *, length: int | None = None
    ) -> None:
        """Send the status line and headers; without ``length`` the body is chunked."""
        headers = [(b"date", http_date()), *headers]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        elif not self._head_only and self._conn.h11.their_http_version == b"1.1":
            headers.append((b"transfer-encoding", b"chunked"))
            self._chunked = True
        self._closing_headers(headers)
        self.started = True
        self.status = status
        await self._conn.send(h11.Response(status_code=status, headers=headers))

    async def write(self, data: bytes) -> None:
        """Send a piece of the body (dropped for HEAD, as HTTP requires)."""
        if not data or self._head_only:
            return
        if self._chunked:  # h11 keeps no per-chunk state: framing it here is equivalent
            await self._conn.send_bytes(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            await self._conn.send(h11.Data(data=data))

    async def end(self) -> None:
        """Finish the body."""
        self.ended = True
        await self._conn.send(h11.EndOfMessage())

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response in one go (one write to the socket)."""
        await self.deliver(self.render(status, headers, body))

    def render(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Delivery:
        """A whole response as bytes, to send with ``deliver`` (after another thread
        may have sent it first); h11 counts it as sent from here on."""
        headers = [(b"date", http_date()), *headers, (b"content-length", str(len(body)).encode())]
        self._closing_headers(headers)
        self.started = self.ended = True
        self.status = status
        h = self._conn.h11
        data = h.send(h11.Response(status_code=status, headers=headers)) or b""
        if body and not self._head_only:
            data += h.send(h11.Data(data=body)) or b""
        h.send(h11.EndOfMessage())  # a Content-Length body ends with no bytes
        return Delivery(self._conn.raw, data)

    async def deliver(self, delivery: Delivery) -> None:
        """Send what another thread did not send of ``delivery``."""
        start = 0
        if not delivery.take():  # the other thread did: its send is over by now, or nearly
            # Wait for it to end (it never blocks): closing the socket under it could let
            # it write into whatever connection gets the same file descriptor next.
            while not delivery.done:
                await trio.sleep(0.001)
            if delivery.failed:
                self._conn.h11.send_failed()
                raise ClientGone()
            start = delivery.sent
        if start < len(delivery.data):
            await self._conn.send_bytes(delivery.data[start:] if start else delivery.data)

    async def abort(self) -> None:
        """Drop the connection without finishing the body (a simulated crash)."""
        self.ended = True
        self._conn.aborted = True
        await self._conn.stream.aclose()


Handler = Callable[[Request, Responder], Awaitable[None]]


class _Connection:
    """One client socket and its h11 state machine; the only reader and writer."""

    def __init__(self, server: HttpServer, stream: trio.SocketStream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.raw = sockio.raw_socket(stream.socket)  # the hot path's calls
        self.client = peer  # the peer address (the connection's, for logs)
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.settings.max_header_bytes
        )
        self.aborted = False
        self.eof = False
        # Set at accept when this address may not connect: its requests get this answer.
        self.refusal: ProxyError | None = None
        self.evicted = False
        self._accepted_at = trio.current_time()
        self._served = 0
        self._wait_scope: trio.CancelScope | None = None  # the wait for the next head
        self._head_begun = False  # bytes of the next head arrived (a drain lets it finish)
        self._head_peek = b""
        self._reading_head = True  # until a head is complete (its bytes are peeked)
        self._close_after = False  # this request's framing is ambiguous: close after it
        self._body_length: int | None = None  # the request's Content-Length (None: chunked)
        self._handler_scope: trio.CancelScope | None = None
        self._responder: Responder | None = None
        self._handler_began = 0.0  # trio time
        self._busy = trio.Event()  # set once a handler runs; renewed when the connection idles
        self._watch_scope: trio.CancelScope | None = None  # a watch in progress

    def evict(self) -> None:
        """Close this idle connection to make room for a new one."""
        self.evicted = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def stop_waiting(self) -> None:
        """A drain: stop waiting for a next request that has not begun to arrive."""
        if self._wait_scope is not None and not self._head_begun:
            self._wait_scope.cancel()

    def closes_after_response(self) -> bool:
        """Whether the response being sent is this connection's last (says Connection: close)."""
        return (self.server.draining or self._close_after
                or self.h11.their_state is not h11.DONE)  # the body is unread

    async def send(self, *events: h11.Event) -> None:
        """Send events with one socket write; a failed write spoils the connection."""
        data = b"".join([self.h11.send(event) or b"" for event in events])
        if data:  # the end of a Content-Length body is no bytes at all
            await self.send_bytes(data)

    async def send_bytes(self, data: bytes) -> None:
        """Write bytes h11 has framed (or that frame like it); failures spoil the connection.

        Straight on the socket (sockio): SocketStream.send_all's context managers and
        schedule point cost more than the rest of a relayed chunk's Python work. This task
        is the connection's only writer.
        """
        try:
            await sockio.send_all(self.raw, data, self.server.settings.send_timeout_s)
        except sockio.Stalled as exc:
            self.h11.send_failed()
            raise ClientStalled() from exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.h11.send_failed()
            raise ClientGone() from exc
        except BaseException:
            self.h11.send_failed()
            raise

    async def watch_loop(self) -> None:
        """Notice the client leaving while a handler runs, and cancel the handler.

        The request loop reads the socket itself, so a request reaches its
        handler without a hand-over from another task. A handler that is still
        running ``WATCH_AFTER_S`` after its whole request arrived (a stream, a
        model loading) gets watched: this task waits until the socket is
        readable and peeks, never taking a byte; EOF or a reset means the
        client left. Bytes of a pipelined request end the watch: they wait for
        the request loop. One task per connection, waking at most every
        ``WATCH_AFTER_S`` while the connection is busy: per request it costs
        nothing.
        """
        while True:
            await self._busy.wait()
            await trio.sleep(WATCH_AFTER_S)
            if self._handler_scope is None or self._handler_began < 0:
                continue  # between requests, or a body still arriving: armed later
            began = self._handler_began
            await trio.sleep_until(began + WATCH_AFTER_S)
            if self._handler_scope is not None and self._handler_began == began \
                    and not self.aborted:  # an aborted handler closed the socket
                await self._watch()

    async def _watch(self) -> None:
        """Until this handler ends (it cancels ``_watch_scope``) or its client leaves."""
        with trio.CancelScope() as scope:
            self._watch_scope = scope
            try:
                while True:
                    try:
                        await trio.lowlevel.wait_readable(self.raw)
                    except trio.ClosedResourceError:  # the handler dropped it (abort)
                        return
                    if scope.cancel_called:  # the socket is the request loop's again
                        return
                    try:
                        peeked = self.raw.recv(1, socket.MSG_PEEK)
                    except BlockingIOError:
                        continue
                    except OSError:  # reset
                        peeked = b""
                    if peeked:  # a pipelined request: read after this handler
                        await trio.sleep_forever()
                    self.eof = True
                    self._client_left()
                    return
            finally:
                self._watch_scope = None

    def _client_left(self) -> None:
        responder, scope = self._responder, self._handler_scope
        if scope is None or responder is None or self.aborted or responder.ended:
            return  # between requests, or after our own end/abort: nobody to cancel
        responder.client_gone = True
        scope.cancel()

    def _arm_watch(self) -> None:
        """The whole request is in: from now on its client leaving is watched for."""
        self._handler_began = trio.current_time()
        self._busy.set()

    async def _feed_h11(self, *, idle: bool = False) -> None:
        """Feed h11 the next bytes from the socket (or its EOF).

        ``idle``: between requests, where nothing is there yet, so skip the read
        that would fail.
        """
        if self.eof:  # h11 must hear it too when the watcher saw it: else NEED_DATA forever
            self.h11.receive_data(b"")
            return
        try:
            data = await sockio.recv(self.raw, RECEIVE_SIZE, wait_first=idle)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if self._reading_head and len(self._head_peek) < HEAD_PEEK_BYTES:
            self._head_peek += data[:HEAD_PEEK_BYTES]  # a head is on its way
        self.h11.receive_data(data)
        if not data:
            self.eof = True

    async def _next_event(self, deadline: float) -> object | None:
        """The next h11 event; None when ``deadline`` passed without the bytes for it.

        The event is usually in h11's buffer already: the deadline's cancel scope is
        set up only when there is something to wait for.
        """
        event = self.h11.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.CancelScope(deadline=deadline):
            while True:
                await self._feed_h11()
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
        return None

    async def _next_request(self) -> h11.Request | None:
        """Wait for a request head: idle waits end silently, partial heads get 408.

        A new connection must bring its whole head within ``header_timeout_s``; a
        kept-alive one may first idle for ``keepalive_timeout_s``, then its head
        must arrive within ``header_timeout_s`` of its first byte. An eviction ends
        either wait; a drain only a wait that has not begun to receive a head.
        """
        settings = self.server.settings
        first = self._served == 0
        self._reading_head = True
        self.server.table.idle(self)  # a new connection is already: since its accept
        pending = self.h11.trailing_data[0]
        self._head_peek = pending[:HEAD_PEEK_BYTES]
        self._head_begun = bool(pending)
        with trio.CancelScope() as wait:
            self._wait_scope = wait
            try:
                if self.evicted or (self.server.draining and not pending):
                    return None
                if not pending:
                    if self._busy.is_set():  # the watcher waits for the next handler
                        self._busy = trio.Event()
                    wait.deadline = (self._accepted_at + settings.header_timeout_s if first
                                     else trio.current_time() + settings.keepalive_timeout_s)
                    await self._feed_h11(idle=True)
                    if not self.h11.trailing_data[0] and self.h11.their_state is h11.IDLE:
                        return None  # the client closed the connection
                    wait.deadline = math.inf
                    self._head_begun = True
                start = self._accepted_at if first else trio.current_time()
                event = await self._next_event(start + settings.header_timeout_s)
            finally:
                self._wait_scope = None
            if event is None:
                self.server.table.busy(self)  # answering: not one to evict meanwhile
                await self.error(408, "timed out reading the request head", self._sniffed_path())
                return None
            return event if isinstance(event, h11.Request) else None  # else ConnectionClosed
        return None  # evicted, drained, or a new connection that never sent a byte

    def _sniffed_path(self) -> str:
        """The path of a request whose head h11 could not parse (for its error dialect)."""
        line = re.split(rb"\r?\n", self._head_peek, maxsplit=1)[0]
        parts = line.split(b" ")
        if len(parts) < 2:
            return "/"
        return parts[1].decode("latin-1").partition("?")[0]

    async def _receive_body(self) -> bytearray:
        """The request body (``Request.read_body``), within ``body_timeout_s``: into one
        buffer that grows as bytes arrive (never a list of pieces to join; never the
        announced length up front, which would let a client that sends one byte of a
        64 MiB body pin 64 MiB)."""
        settings = self.server.settings
        limit, length = settings.max_body_bytes, self._body_length
        if length is not None and length > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        if self.h11.client_is_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        ends = trio.current_time() + settings.body_timeout_s
        try:
            while True:
                event = await self._next_event(
                    min(ends, trio.current_time() + settings.header_timeout_s))
                if isinstance(event, h11.Data):
                    # h11 never gives more than a Content-Length; a chunked body may
                    if len(body) + len(event.data) > limit:
                        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    if self._handler_scope is not None:
                        self._arm_watch()
                    return body
                elif event is None:
                    raise RequestTimeout(
                        f"timed out reading the request body ({len(body)} bytes in; it must arrive "
                        f"within {settings.body_timeout_s:g} s, with no pause of "
                        f"{settings.header_timeout_s:g} s)")
                else:
                    raise ClientGone()
        except h11.RemoteProtocolError as exc:
            if self.eof:
                raise ClientGone() from exc
            raise BadRequest(f"malformed request body: {_reason(exc)}") from None

    async def error(self, status: int, message: str, path: str = "/") -> None:
        """Answer an error of the server's own, then this connection closes."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = error_body(family_of(path), status, message, None)
        headers = [
            (b"date", http_date()),
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            await self.send(h11.Response(status_code=status, headers=headers), h11.Data(data=body),
                            h11.EndOfMessage())
        except ClientGone:
            pass

    async def _run_handler(self, request: Request) -> Responder:
        responder = Responder(self, request.method)
        with trio.CancelScope() as scope:
            self._handler_scope, self._responder = scope, responder
            if self.eof:  # gone already, before its answer began
                self._client_left()
            if request._unread is None:
                self._arm_watch()
            else:  # once its body is in: the watch would take body bytes for a next request
                self._handler_began = -1.0
                if self._busy.is_set():
                    self._busy = trio.Event()
            try:
                await self.server.handler(request, responder)
            except ClientGone:
                responder.client_gone = True
            except ProxyError as err:
                if responder.started:  # too late for a status: cut the body short
                    log.warning("%s %s failed mid-response: %s", request.method, request.path, err)
                    self.aborted = True
                else:
                    await self._send_proxy_error(request, err)
            except Exception:
                log.exception("handler failed for %s %s", request.method, request.path)
                if not responder.started:
                    await self.error(500, "internal error", request.path)
                else:  # h11 counts a rendered response as sent, delivered or not: close
                    self.aborted = True
            finally:
                self._handler_scope = self._responder = None
                self.server.forget(responder._stops)
                if self._watch_scope is not None:  # the socket is the request loop's again
                    self._watch_scope.cancel()
        return responder

    async def _send_proxy_error(self, request: Request, err: ProxyError) -> None:
        body = render(family_of(request.path), err)
        headers = [(b"content-type", b"application/json; charset=utf-8"), *err.headers()]
        try:
            await Responder(self, request.method).respond(err.status, headers, body)
        except ClientGone:
            pass

    def _request(self, head: h11.Request) -> Request:
        """The ``Request`` of a head; a body-less one's end is taken at once."""
        target = head.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        headers = list(head.headers)
        length: bytes | None = None
        chunked = False
        forwarded: list[bytes] = []
        for name, value in headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"x-forwarded-for":
                forwarded.append(value)
        # Both framings (RFC 9112 §6.1): h11 reads it chunked, and the connection closes.
        self._close_after = chunked and length is not None
        self._body_length = None if chunked else int(length or 0)
        addresses = self.server.settings.addresses
        client = self.client if addresses.open else addresses.client_of(self.client, forwarded)
        return Request(method=head.method.decode("ascii", "replace"), target=target, path=path,
                       query=query, headers=headers, body=b"", client=client,
                       _unread=self._receive_body if chunked or self._body_length else None)

    async def run(self) -> None:
        while True:
            try:
                head = await self._next_request()
                if head is None:
                    return
                self._reading_head = False
                self.server.table.busy(self)  # a request is in flight
                path = head.target.partition(b"?")[0].decode("ascii", "replace")
                if _head_size(head) > self.server.settings.max_header_bytes:
                    # h11 caps only heads still incomplete; one read can bring a whole big one
                    await self.error(431, "request header block is too large", path)
                    return
                request = self._request(head)
                if request._unread is None:  # no body: take its end now
                    event = self.h11.next_event()
                    assert isinstance(event, h11.EndOfMessage), event
            except h11.RemoteProtocolError as exc:
                await self.error(exc.error_status_hint, f"malformed request: {_reason(exc)}",
                                 self._sniffed_path())
                return
            refusal = self.refusal
            if refusal is None and request.client != self.client \
                    and not self.server.settings.addresses.admits(request.client):
                refusal = address_refused()
            if refusal is not None:
                self._close_after = True
                await self._send_proxy_error(request, refusal)
                return
            responder = await self._run_handler(request)
            self._served += 1
            if (
                responder.client_gone
                or self.aborted
                or self._close_after
                or self.server.draining
                or self.h11.our_state is not h11.DONE
                or self.h11.their_state is not h11.DONE
            ):
                return
            self.h11.start_next_cycle()

    async def aclose(self, *, linger: bool = True) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            if linger and self.h11.their_state is h11.SEND_BODY and not self.eof \
                    and not self.aborted:
                await self._linger()
            await self.stream.aclose()

    async def _linger(self) -> None:
        """The client may still be sending a body we did not read: half-close (our
        answer is out), then discard what arrives for a moment, so that closing does
        not reset the connection before the client read the answer. Bounded by
        ``LINGER_S`` and ``LINGER_BYTES``: a refused stranger costs little."""
        try:
            self.raw.shutdown(socket.SHUT_WR)
        except OSError:
            return
        left = LINGER_BYTES
        with trio.move_on_after(LINGER_S):
            while left > 0:
                try:
                    data = await sockio.recv(self.raw, RECEIVE_SIZE)
                except OSError:
                    return
                if not data:
                    return
                left -= len(data)


def _head_size(head: h11.Request) -> int:
    return len(head.target) + sum(len(k) + len(v) + 4 for k, v in head.headers)


def _reason(exc: h11.RemoteProtocolError) -> str:
    """h11's complaint without the raw bytes it quotes (never echoed to the client)."""
    return re.split(r":\s*(?:bytearray\()?b['\"]", str(exc), maxsplit=1)[0] or "malformed data"


def address_refused() -> ProxyError:
    return ProxyError("this client address may not use the gateway (allow/deny)", status=403,
                      code="address_not_allowed")


_REFUSED_FULL = error_body(ApiFamily.NATIVE, 503, "the gateway has too many connections; retry",
                           "too_many_connections")


class HttpServer:
    """Accepts connections and runs one ``_Connection`` task per socket.

    At most ``max_connections`` connections in all and ``max_connections_per_ip``
    from one address (trusted proxies excepted) are open at once; a new one past
    either cap closes the longest-idle connection with no request in flight (in
    that address's, for the per-address cap), or is answered 503 and closed when
    there is none.
    """

    def __init__(self, handler: Handler, settings: ServerSettings | None = None) -> None:
        self.handler = handler
        self.settings = settings or ServerSettings()
        self.draining = False
        self._accept_scope = trio.CancelScope()
        self.table: ConnectionTable[_Connection] = ConnectionTable(
            self.settings.max_connections, self.settings.max_connections_per_ip,
            exempt=self.settings.addresses.is_trusted_proxy)
        self._conn_nursery: trio.Nursery | None = None
        self._grace = trio.CancelScope()  # a drain sets its deadline: the grace's end
        self._stopping = False  # the grace ran out
        self._emptied = trio.Event()  # draining, the last connection closed
        self._on_stop: set[Callable[[], None]] = set()
        self.evicted = 0  # idle connections closed to make room (stats, tests)
        self.refused = 0  # connections refused at a cap

    def on_stop(self, callback: Callable[[], None]) -> None:
        """``Responder.on_stop``: ``callback`` runs when the drain's grace runs out."""
        if self._stopping:
            callback()
        else:
            self._on_stop.add(callback)

    def forget(self, callbacks: list[Callable[[], None]]) -> None:
        for callback in callbacks:
            self._on_stop.discard(callback)

    async def _stop_when_the_grace_ends(self) -> None:
        with self._grace:
            await self._emptied.wait()  # all done in time: nothing to stop
        if self._emptied.is_set():
            return
        self._stopping = True
        callbacks, self._on_stop = self._on_stop, set()
        for callback in callbacks:
            callback()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 = any free port) until drained or cancelled.

        ``task_status.started`` reports the bound ``(host, port)``.
        """
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        if port == 0 and len(listeners) > 1:  # each would get its own random port: keep one
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        bound = listeners[0].socket.getsockname()
        async with trio.open_nursery() as conns:
            self._conn_nursery = conns
            with self._accept_scope:
                async with trio.open_nursery() as accept:
                    for listener in listeners:
                        accept.start_soon(self._accept_loop, listener, conns)
                    task_status.started((bound[0], bound[1]))
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _accept_loop(self, listener: trio.SocketListener, conns: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.warning("accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            conn = self._admit(stream)
            if conn is None:
                self.refused += 1
                conns.start_soon(_refuse, stream)
            else:
                conns.start_soon(self._handle, conn)

    def _admit(self, stream: trio.SocketStream) -> _Connection | None:
        """A connection for ``stream``, room made for it; None when there is no room."""
        try:
            peer = str(stream.socket.getpeername()[0])
        except OSError:
            peer = "?"
        conn = _Connection(self, stream, peer)
        addresses = self.settings.addresses
        if not addresses.is_trusted_proxy(peer) and not addresses.admits(peer):
            conn.refusal = address_refused()  # behind a proxy: checked per request
        admitted, evict = self.table.admit(conn, peer)
        for victim in evict:
            victim.evict()
        self.evicted += len(evict)
        return conn if admitted else None

    async def _handle(self, conn: _Connection) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.watch_loop)
                try:
                    await conn.run()
                finally:
                    nursery.cancel_scope.cancel()
        except Exception:  # contained: one bad connection never stops the server
            log.exception("connection from %s failed", conn.client)
        finally:
            # Counted until closed (a lingering socket is a file descriptor too); no
            # linger once half the connections are taken: then refusals close at once.
            await conn.aclose(linger=len(self.table) < self.settings.max_connections // 2)
            self.table.remove(conn)
            if self.draining and not self.table:
                self._emptied.set()

    def drain(self, grace_s: float) -> None:
        """Stop accepting and close idle connections. In-flight responses get
        ``grace_s``; then their ``on_stop`` callbacks run (a stream's backend
        connection is closed, so it ends with an error frame), and whatever still runs
        ``FINISH_S`` later is cancelled outright. A second drain can only shorten it."""
        self.draining = True
        self._accept_scope.cancel()
        for conn in list(self.table):
            conn.stop_waiting()
        if not self.table:
            self._emptied.set()
        first = self._grace.deadline == math.inf
        stop_at = min(self._grace.deadline, trio.current_time() + grace_s)
        self._grace.deadline = stop_at
        if self._conn_nursery is not None:
            if first:
                self._conn_nursery.start_soon(self._stop_when_the_grace_ends)
            self._conn_nursery.cancel_scope.deadline = stop_at + FINISH_S


async def _refuse(stream: trio.SocketStream) -> None:
    """Answer 503 to a connection there is no room for, without waiting for it."""
    data = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json; charset=utf-8\r\n"
            b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%b"
            % (len(_REFUSED_FULL), _REFUSED_FULL))
    try:
        sockio.raw_socket(stream.socket).send(data)  # never blocks: whatever fits
    except OSError:
        pass
    with trio.CancelScope(shield=True):
        await stream.aclose()

"""The HTTP/1.1 server: one h11 connection per socket, keep-alive and
pipelining, request limits with clean errors, client-gone detection, and a
graceful drain. What to do with a request is injected as a ``Handler``.

The request loop reads the client socket itself. A handler still running
after ``WATCH_AFTER_S`` gets a watcher that peeks at the socket: EOF there
means the client left, and the handler's cancel scope is cancelled at once, so
a proxied upstream request dies with it (even while nothing is being written).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Awaitable, Callable

import h11
import trio

from . import sockio
from .errors import ProxyError, error_body, family_of, render

log = logging.getLogger("ollama_proxy.server")

# Large reads keep per-request work low; h11 buffers what it is not asked for yet.
RECEIVE_SIZE = 64 * 1024
# A handler still running this long gets a watcher for its client leaving; most
# small requests are over sooner and cost the watcher nothing.
WATCH_AFTER_S = 0.05
# Bounded time for a polite close (shielded), so a stuck peer cannot hold us.
CLOSE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Limits of the HTTP server (``[server]`` section, in bytes and seconds)."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0


@dataclass(frozen=True, slots=True)
class Request:
    """A fully received request (the body is read before the handler runs)."""

    method: str
    target: str
    path: str
    query: str
    headers: list[tuple[bytes, bytes]]  # names lower-cased by h11
    body: bytes
    client: str  # peer address, for logs and IP rules

    def header(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


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

    __slots__ = ("_conn", "_head_only", "_chunked", "started", "ended", "client_gone", "status")

    def __init__(self, conn: _Connection, method: str) -> None:
        self._conn = conn
        self._head_only = method == "HEAD"
        self._chunked = False  # we frame the chunks ourselves (the hot path), h11 the rest
        self.started = False
        self.ended = False
        self.client_gone = False
        self.status = 0

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
        if self._conn.server.draining:
            headers.append((b"connection", b"close"))
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
        if self._conn.server.draining:
            headers.append((b"connection", b"close"))
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

    def __init__(self, server: HttpServer, stream: trio.SocketStream, client: str) -> None:
        self.server = server
        self.stream = stream
        self.raw = sockio.raw_socket(stream.socket)  # the hot path's calls
        self.client = client
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.settings.max_header_bytes
        )
        self.aborted = False
        self.idle_scope: trio.CancelScope | None = None
        self.eof = False
        self._handler_scope: trio.CancelScope | None = None
        self._responder: Responder | None = None
        self._handler_began = 0.0  # trio time
        self._busy = trio.Event()  # set once a handler runs; renewed when the connection idles
        self._watch_scope: trio.CancelScope | None = None  # a watch in progress

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
            await sockio.send_all(self.raw, data)
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
        running ``WATCH_AFTER_S`` after it began (a stream, a model loading)
        gets watched: this task waits until the socket is readable and peeks,
        never taking a byte; EOF or a reset means the client left. Bytes of a
        pipelined request end the watch: they wait for the request loop. One
        task per connection, waking at most every ``WATCH_AFTER_S`` while the
        connection is busy: per request it costs nothing.
        """
        while True:
            await self._busy.wait()
            await trio.sleep(WATCH_AFTER_S)
            if self._handler_scope is None:
                continue  # between requests; the next one sets _busy again
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
        self.h11.receive_data(data)
        if not data:
            self.eof = True

    async def _next_event(self, timeout_s: float) -> object | None:
        """The next h11 event; None when ``timeout_s`` passed without the bytes for it.

        The event is usually in h11's buffer already: the timeout's cancel scope is
        set up only when there is something to wait for.
        """
        event = self.h11.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_after(timeout_s):
            while True:
                await self._feed_h11()
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
        return None

    async def _next_request(self) -> h11.Request | None:
        """Wait for a request head: idle waits end silently, partial heads get 408."""
        settings = self.server.settings
        if not self.h11.trailing_data[0]:
            if self.server.draining:
                return None
            # Idle: nothing of the next request yet. One scope ends the wait on the
            # keep-alive timeout or on a drain (which cancels it).
            self.idle_scope = trio.CancelScope(
                deadline=trio.current_time() + settings.keepalive_timeout_s)
            if self._busy.is_set():  # the watcher waits for the next handler
                self._busy = trio.Event()
            with self.idle_scope:
                await self._feed_h11(idle=True)
            self.idle_scope = None
            if not self.h11.trailing_data[0] and self.h11.their_state is h11.IDLE:
                return None
        event = await self._next_event(settings.header_timeout_s)
        if event is None:
            await self.error(408, "timed out reading the request head")
            return None
        return event if isinstance(event, h11.Request) else None  # else ConnectionClosed

    async def _read_body(self, path: str, length: bytes | None) -> bytes | None:
        """The whole body, or None after answering 413 (too big) or 408 (too slow)."""
        limit = self.server.settings.max_body_bytes
        if length is not None and int(length) > limit:
            await self.error(413, f"request body is larger than {limit} bytes", path)
            return None
        if self.h11.client_is_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(self.server.settings.header_timeout_s)
            if event is None:
                await self.error(408, "timed out reading the request body", path)
                return None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    await self.error(413, f"request body is larger than {limit} bytes", path)
                    return None
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:  # ConnectionClosed mid-body
                return None

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
            self._handler_began = trio.current_time()
            self._busy.set()
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
                if self._watch_scope is not None:  # the socket is the request loop's again
                    self._watch_scope.cancel()
        return responder

    async def _send_proxy_error(self, request: Request, err: ProxyError) -> None:
        body = render(family_of(request.path), err)
        headers = [(b"content-type", b"application/json; charset=utf-8"), *err.headers()]
        await Responder(self, request.method).respond(err.status, headers, body)

    async def run(self) -> None:
        while True:
            try:
                head = await self._next_request()
                if head is None:
                    return
                if _head_size(head) > self.server.settings.max_header_bytes:
                    # h11 caps only heads still incomplete; one read can bring a whole big one
                    await self.error(431, "request header block is too large")
                    return
                target = head.target.decode("ascii", "replace")
                path, _, query = target.partition("?")
                headers = list(head.headers)
                length = next((v for k, v in headers if k == b"content-length"), None)
                body = await self._read_body(path, length)
            except h11.RemoteProtocolError as exc:
                await self.error(exc.error_status_hint, f"malformed request: {exc}")
                return
            if body is None:
                return
            request = Request(method=head.method.decode("ascii", "replace"), target=target,
                              path=path, query=query, headers=headers, body=body,
                              client=self.client)
            responder = await self._run_handler(request)
            if (
                responder.client_gone
                or self.aborted
                or self.server.draining
                or self.h11.our_state is not h11.DONE
                or self.h11.their_state is not h11.DONE
            ):
                return
            self.h11.start_next_cycle()

    async def aclose(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            await self.stream.aclose()


def _head_size(head: h11.Request) -> int:
    return len(head.target) + sum(len(k) + len(v) + 4 for k, v in head.headers)


class HttpServer:
    """Accepts connections and runs one ``_Connection`` task per socket."""

    def __init__(self, handler: Handler, settings: ServerSettings | None = None) -> None:
        self.handler = handler
        self.settings = settings or ServerSettings()
        self.draining = False
        self._accept_scope = trio.CancelScope()
        self._connections: set[_Connection] = set()
        self._conn_nursery: trio.Nursery | None = None

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
            conns.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            client = str(peer[0])
        except OSError:
            client = "?"
        conn = _Connection(self, stream, client)
        self._connections.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.watch_loop)
                try:
                    await conn.run()
                finally:
                    nursery.cancel_scope.cancel()
        except Exception:  # contained: one bad connection never stops the server
            log.exception("connection from %s failed", client)
        finally:
            self._connections.discard(conn)
            await conn.aclose()

    def drain(self, grace_s: float) -> None:
        """Stop accepting, close idle connections, cancel the rest after ``grace_s``."""
        self.draining = True
        self._accept_scope.cancel()
        for conn in list(self._connections):
            if conn.idle_scope is not None:
                conn.idle_scope.cancel()
        if self._conn_nursery is not None:
            self._conn_nursery.cancel_scope.deadline = trio.current_time() + grace_s

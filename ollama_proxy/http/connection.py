"""One client connection: its request loop over h11, from the first bytes of a head
to the keep-alive decision, and its close.

The loop reads the socket itself (heads, and bodies when a handler asks), runs the
injected handler with a ``Responder``, and answers the server's own errors (a
malformed or oversized head, a slow client) in the path's dialect. What the
connection does is one ``ConnState`` (``connstate``); a ``ClientWatch`` notices the
client leaving while a handler runs. Strangers pay nothing: a body is read only
when its handler asks (``Request.read_body``), after it checked the key.
"""

from __future__ import annotations

import logging
import math
import socket
from typing import TYPE_CHECKING

import h11
import trio

from ..errors import BadRequest, PayloadTooLarge, ProxyError, RequestTimeout, error_body, family_of, render
from . import sockio
from .connstate import ConnEvent, ConnState, Lifecycle
from .messages import JSON_TYPE, Request, complaint, head_size, http_date, path_of_head
from .responder import ClientGone, ClientStalled, Responder
from .watch import ClientWatch

if TYPE_CHECKING:
    from .server import HttpServer

log = logging.getLogger("ollama_proxy.server")

# Closing a socket with unread bytes resets it, which can destroy the answer we just
# sent (a 401 to a client still uploading): half-close, then discard what arrives for
# at most this long and this much, so a refused client reads its answer.
LINGER_S = 1.0
LINGER_BYTES = 1024 * 1024
# The start of a request head kept to tell its path (and so its error dialect) when
# the head turns out malformed: h11 consumes the bytes it rejects.
HEAD_PEEK_BYTES = 512

_READING_HEAD = (ConnState.IDLE, ConnState.READING)


class ServerConnection:
    """One client socket and its h11 state machine; the only reader and writer."""

    def __init__(self, server: HttpServer, stream: trio.SocketStream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.raw = sockio.raw_socket(stream.socket)  # the hot path's calls
        self.client = peer  # the peer address (the connection's, for logs)
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.settings.max_header_bytes
        )
        self.life = Lifecycle()
        self.watch = ClientWatch(self.raw, self._client_left)
        # The peer's EOF (or a reset) was seen. A fact about the peer, not a state of
        # ours: requests it pipelined before leaving are still read.
        self.eof = False
        # Set at accept when this address may not connect: its requests get this answer.
        self.refusal: ProxyError | None = None
        self._accepted_at = trio.current_time()
        self._served = 0
        # The wait for the next request, current or coming: an eviction or a drain cancels it.
        self._wait = trio.CancelScope()
        self._head_peek = b""
        self._body_length: int | None = None  # the request's Content-Length (None: chunked)
        self._handler_scope: trio.CancelScope | None = None

    def evict(self) -> None:
        """Close this idle connection to make room for a new one."""
        self._wait.cancel()

    def stop_waiting(self) -> None:
        """A drain: stop waiting for a next request that has not begun to arrive."""
        if self.life.state is ConnState.IDLE:
            self._wait.cancel()

    def closes_after_response(self) -> bool:
        """Whether the response being sent is this connection's last (says Connection: close)."""
        return not self.life.may_continue(draining=self.server.draining,
                                          their_done=self.h11.their_state is h11.DONE)

    def answered(self) -> None:
        """The handler's response is complete (its last bytes are h11's)."""
        self.life.fire(ConnEvent.RESPONSE_ENDS)

    def abort(self) -> None:
        """The answer is cut short: the connection closes at once, without lingering."""
        self.life.fire(ConnEvent.ABORT)
        self.watch.disarm()

    def answer_begun(self) -> bool:
        """Too late for a status line: h11 has one out already."""
        return self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    def _request_in(self) -> None:
        """The whole request is in: from now on its client leaving is watched for."""
        if self.life.fire(ConnEvent.REQUEST_ENDS) is ConnState.WATCHED:
            self.watch.arm()

    def _client_left(self) -> None:
        """EOF or a reset: a handler whose answer is incomplete is cancelled."""
        self.eof = True
        if self.life.fire(ConnEvent.CLIENT_LEFT) is ConnState.GONE:
            self.watch.disarm()
            assert self._handler_scope is not None
            self._handler_scope.cancel()

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

    async def _feed_h11(self, *, idle: bool = False) -> None:
        """Feed h11 the next bytes from the socket (or its EOF).

        ``idle``: between requests, where nothing is there yet, so skip the read
        that would fail.
        """
        if self.eof:  # h11 must hear it too when the watcher saw it: else NEED_DATA forever
            self.h11.receive_data(b"")
            return
        try:
            data = await sockio.recv(self.raw, sockio.RECEIVE_SIZE, wait_first=idle)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if self.life.state in _READING_HEAD and len(self._head_peek) < HEAD_PEEK_BYTES:
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
        self.server.table.idle(self)  # a new connection is already: since its accept
        pending = self.h11.trailing_data[0]
        self._head_peek = pending[:HEAD_PEEK_BYTES]
        with self._wait as wait:
            try:
                if not pending:
                    self.watch.rest()  # until a handler's request is in
                    wait.deadline = (self._accepted_at + settings.header_timeout_s if first
                                     else trio.current_time() + settings.keepalive_timeout_s)
                    await self._feed_h11(idle=True)
                    if not self.h11.trailing_data[0] and self.h11.their_state is h11.IDLE:
                        return None  # the client closed the connection
                    wait.deadline = math.inf
                self.life.fire(ConnEvent.HEAD_BEGINS)
                start = self._accepted_at if first else trio.current_time()
                event = await self._next_event(start + settings.header_timeout_s)
            finally:
                self._wait = trio.CancelScope()
            if event is None:
                self.server.table.busy(self)  # answering: not one to evict meanwhile
                await self.error(408, "timed out reading the request head",
                                 path_of_head(self._head_peek))
                return None
            return event if isinstance(event, h11.Request) else None  # else ConnectionClosed
        return None  # evicted, drained, or a new connection that never sent a byte

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
                    self._request_in()
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
            raise BadRequest(f"malformed request body: {complaint(exc)}") from None

    async def error(self, status: int, message: str, path: str = "/") -> None:
        """Answer an error of the server's own, then this connection closes."""
        if self.answer_begun():
            return
        body = error_body(family_of(path), status, message, None)
        headers = [(b"date", http_date()), (b"content-type", JSON_TYPE),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        try:
            await self.send(h11.Response(status_code=status, headers=headers), h11.Data(data=body),
                            h11.EndOfMessage())
        except ClientGone:
            pass

    async def _run_handler(self, request: Request) -> None:
        responder = Responder(self, request.method)
        with trio.CancelScope() as scope:
            self._handler_scope = scope
            if request._unread is None:
                self._request_in()
            else:  # watched once its body is in: a watch now would take body bytes for a request's
                self.watch.rest()
            if self.eof:  # gone already, before its answer began
                self._client_left()
            try:
                await self.server.handler(request, responder)
            except ClientGone:
                self.life.fire(ConnEvent.CLIENT_LEFT)
            except ProxyError as err:
                if self.answer_begun():  # too late for a status: cut the body short
                    log.warning("%s %s failed mid-response: %s", request.method, request.path, err)
                    self.abort()
                else:
                    await self._send_proxy_error(request, err)
            except Exception:
                log.exception("handler failed for %s %s", request.method, request.path)
                if not self.answer_begun():
                    await self.error(500, "internal error", request.path)
                else:  # too late for a status: cut the body short
                    self.abort()
            finally:
                self._handler_scope = None
                responder.forget_stops()
                self.watch.disarm()  # the socket is the request loop's again

    async def _send_proxy_error(self, request: Request, err: ProxyError) -> None:
        body = render(family_of(request.path), err)
        headers = [(b"content-type", JSON_TYPE), *err.headers()]
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
        self.life.must_close = chunked and length is not None
        self._body_length = None if chunked else int(length or 0)
        addresses = self.server.settings.addresses
        client = self.client if addresses.open else addresses.client_of(self.client, forwarded)
        return Request(method=head.method.decode("ascii", "replace"), target=target, path=path,
                       query=query, headers=headers, body=b"", client=client,
                       _unread=self._receive_body if chunked or self._body_length else None)

    async def run(self) -> None:
        """Serve requests until one closes the connection; ``watch.run`` runs beside it."""
        try:
            await self._serve()
        finally:
            self.life.fire(ConnEvent.CLOSE)

    async def _serve(self) -> None:
        while True:
            try:
                head = await self._next_request()
                if head is None:
                    return
                self.life.fire(ConnEvent.HEAD_ENDS)
                self.server.table.busy(self)  # a request is in flight
                path = head.target.partition(b"?")[0].decode("ascii", "replace")
                if head_size(head.target, head.headers) > self.server.settings.max_header_bytes:
                    # h11 caps only heads still incomplete; one read can bring a whole big one
                    await self.error(431, "request header block is too large", path)
                    return
                request = self._request(head)
                if request._unread is None:  # no body: take its end now
                    event = self.h11.next_event()
                    assert isinstance(event, h11.EndOfMessage), event
            except h11.RemoteProtocolError as exc:
                await self.error(exc.error_status_hint, f"malformed request: {complaint(exc)}",
                                 path_of_head(self._head_peek))
                return
            refusal = self.refusal
            if refusal is None and request.client != self.client \
                    and not self.server.settings.addresses.admits(request.client):
                refusal = address_refused()
            if refusal is not None:
                self.life.must_close = True
                await self._send_proxy_error(request, refusal)
                return
            await self._run_handler(request)
            self._served += 1
            if not self.life.next_request(draining=self.server.draining,
                                          our_done=self.h11.our_state is h11.DONE,
                                          their_done=self.h11.their_state is h11.DONE):
                return
            self.h11.start_next_cycle()

    async def aclose(self, *, linger: bool = True) -> None:
        if linger and self.h11.their_state is h11.SEND_BODY and not self.eof \
                and self.life.state is not ConnState.ABORTED:
            with trio.CancelScope(shield=True):
                await self._linger()
        await sockio.aclose(self.stream)

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
                    data = await sockio.recv(self.raw, sockio.RECEIVE_SIZE)
                except OSError:
                    return
                if not data:
                    return
                left -= len(data)


def address_refused() -> ProxyError:
    return ProxyError("this client address may not use the gateway (allow/deny)", status=403,
                      code="address_not_allowed")

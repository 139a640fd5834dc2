"""How a handler answers: the ``Responder`` of its request (status and headers,
the body as one piece or in chunks, or a dropped connection), and how it learns
that its client is gone.

The responder writes through its connection (the only writer of the socket) and
tells it when the answer is complete or cut short (``connstate``); whether the
connection is kept alive after it is the connection's decision.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Callable

import h11
import trio

from .connstate import ConnState
from .messages import http_date

if TYPE_CHECKING:
    from .connection import ServerConnection


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


class ClientStalled(ClientGone):
    """The client accepted no byte of its response for ``send_timeout_s``: the
    connection is cut as if it had left."""


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

    __slots__ = ("_conn", "_head_only", "_chunked", "_stops")

    def __init__(self, conn: ServerConnection, method: str) -> None:
        self._conn = conn
        self._head_only = method == "HEAD"
        self._chunked = False  # we frame the chunks ourselves (the hot path), h11 the rest
        self._stops: list[Callable[[], None]] = []

    @property
    def started(self) -> bool:
        """The status line is out: too late to answer with an error status."""
        return self._conn.answer_begun()

    @property
    def client_gone(self) -> bool:
        """The client left before this answer was complete (the handler is cancelled)."""
        return self._conn.life.state is ConnState.GONE

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called when a drain's grace runs out (at once if it has): it
        should make the handler's work end (e.g. close its backend connection), and the
        handler then has ``FINISH_S`` to end its response well."""
        self._stops.append(callback)
        self._conn.server.on_stop(callback)

    def forget_stops(self) -> None:
        """The handler is over: a drain has nothing of it to stop."""
        self._conn.server.forget(self._stops)

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
        self._conn.answered()
        await self._conn.send(h11.EndOfMessage())

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response in one go (one write to the socket)."""
        await self.deliver(self.render(status, headers, body))

    def render(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Delivery:
        """A whole response as bytes, to send with ``deliver`` (after another thread
        may have sent it first); h11 counts it as sent from here on."""
        headers = [(b"date", http_date()), *headers, (b"content-length", str(len(body)).encode())]
        self._closing_headers(headers)
        self._conn.answered()
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
        self._conn.abort()
        await self._conn.stream.aclose()

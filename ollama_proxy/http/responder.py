"""How a handler answers: the ``Responder`` of its request (status and headers,
the body as one piece or in chunks, or a dropped connection), and how it learns
that its client is gone.

The responder writes through its connection (the only writer of the socket) and
tells it when the answer is complete or cut short (``connstate``); whether the
connection is kept alive after it is the connection's decision.
"""

from __future__ import annotations

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
        headers = [(b"date", http_date()), *headers, (b"content-length", str(len(body)).encode())]
        self._closing_headers(headers)
        self._conn.answered()
        response = h11.Response(status_code=status, headers=headers)
        if body and not self._head_only:
            await self._conn.send(response, h11.Data(data=body), h11.EndOfMessage())
        else:  # a Content-Length body ends with no bytes
            await self._conn.send(response, h11.EndOfMessage())

    async def abort(self) -> None:
        """Drop the connection without finishing the body (a simulated crash)."""
        self._conn.abort()
        await self._conn.stream.aclose()
